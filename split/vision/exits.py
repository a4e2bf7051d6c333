"""Exit branches (BranchyNet): small classifiers after chosen stages, trained jointly with the
backbone; at run time a frame leaves at the first exit whose confidence passes its threshold.

    net = attach_exits(backbone, ["stage1", "stage2"], example)   # EarlyExitNet
    logits = net(x)                        # [exit after stage1, exit after stage2, final]: each (B, 10)
    t = calibrate_threshold(conf_val, correct_val, target_accuracy)
    rates = exit_rates(conf_val_per_exit, thresholds)   # what the planner expects to leave at each exit

Confidence is the max softmax probability; a frame exits when confidence > threshold (strictly),
so threshold 1.0 never exits and 0 always exits at the first branch.
"""
import numpy as np
import torch
from torch import nn

from split.vision.cut import cut_index, stage_names
from split.vision.models import NUM_CLASSES


def exit_head(activation_shape, classes: int = NUM_CLASSES) -> nn.Module:
    """A cheap classifier for an activation: conv features (B, C, H, W) or tokens (B, T, D)."""
    if len(activation_shape) == 4:           # pool to at most 8x8 first: the branch must stay cheap
        c, side = activation_shape[1], min(8, activation_shape[2])
        return nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))
    if len(activation_shape) == 3:
        return TokenExit(activation_shape[2], classes)
    raise ValueError(f"no exit head for activations of shape {activation_shape}")


class TokenExit(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):                      # (B, T, D) -> (B, classes), from the mean token
        return self.fc(self.norm(x.mean(1)))


class EarlyExitNet(nn.Module):
    def __init__(self, backbone: nn.Sequential, exits: dict[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.exits = nn.ModuleDict(exits)
        names = stage_names(backbone)
        self.exit_after = sorted(exits, key=names.index)      # stage names, in order

    def forward(self, x) -> list[torch.Tensor]:
        outputs = []
        for name, stage in self.backbone.named_children():
            x = stage(x)
            if name in self.exits:
                outputs.append(self.exits[name](x))
        return outputs + [x]


@torch.no_grad()
def attach_exits(backbone: nn.Sequential, after: list[str], example: torch.Tensor, seed: int = 0) -> EarlyExitNet:
    torch.manual_seed(seed)
    exits = {}
    for name in after:
        k = cut_index(backbone, name)
        if k == len(backbone):
            raise ValueError(f"an exit after the last stage '{name}' is the model's own output")
        exits[name] = exit_head(tuple(backbone.eval()[:k](example).shape))
    return EarlyExitNet(backbone, exits)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, K) logits -> (B,) max softmax probability (numerically stable)."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(-1, keepdims=True)).max(-1)


def first_exit(confidences: np.ndarray, thresholds) -> np.ndarray:
    """confidences (E, B) at E exits, thresholds (E,): index of the first exit taken, E = none."""
    thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), (confidences.shape[0],))
    taken = confidences > thresholds[:, None]                              # (E, B)
    return np.where(taken.any(0), taken.argmax(0), confidences.shape[0])


def exit_rates(confidences: np.ndarray, thresholds) -> list[float]:
    """confidences (E, B) at E exits, thresholds (E,): at each exit, the fraction of the frames that
    reach it (did not leave earlier) that leave there; 0.0 where none reach it."""
    where = first_exit(confidences, thresholds)
    rates = []
    for e in range(confidences.shape[0]):
        reached = int((where >= e).sum())
        rates.append(float((where == e).sum()) / reached if reached else 0.0)
    return rates


def calibrate_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest threshold at which the frames that exit (confidence > t) are at least `target`
    accurate on held-out data; 1.0 (never exit) when no threshold reaches it."""
    order = np.argsort(-confidence)
    conf, hits = confidence[order], correct[order].astype(np.float64)
    accuracy = np.cumsum(hits) / np.arange(1, len(hits) + 1)      # accuracy of the k most confident
    best = 1.0
    for k in range(len(conf)):        # exit set = the k+1 most confident (ties kept together)
        if accuracy[k] >= target and (k + 1 == len(conf) or conf[k + 1] < conf[k]):
            best = float(conf[k + 1]) if k + 1 < len(conf) else 0.0   # conf[k] > t >= conf[k+1]
    return best
