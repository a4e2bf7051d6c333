"""ED-ViT (issue 16): a trained ViT split class-wise into small sub-models for peer devices, and the
fusion head that joins their answers on the requesting device.

    parts = partition_classes(10, [1.0, 1.0, 0.5])        # every class exactly once, more to the faster
    scores = importance(full, parts[0], x, y)             # per block: (heads,), (MLP channels,)
    sub = class_wise_submodel(full, parts[0], scores, heads=1, hidden=32)
    distill(sub, full, parts[0], x, epochs=6)             # its classes + "other", from the full model
    fusion = train_fusion(subs, parts, x, y)              # an MLP over every sub-model's answer
    logits = fusion(*fusion_inputs([sub(x) for sub in subs], present))   # a missing peer: present 0

A sub-model keeps the full model's embedding and width; in every block it keeps the attention heads
and MLP channels that matter most to its classes (first-order Taylor importance: |activation x
gradient| of the full model's loss on images of those classes), and its head answers its classes
plus one "other" logit. It is then distilled from the full model on all training images (the
full model's probabilities folded to its classes + other, and the true label folded the same way).
The fusion sees each sub-model's log-probabilities (zeros where a peer did not answer) and which
peers answered; it is trained with peers dropped at random, so a missing peer degrades the answer
instead of breaking it.
"""
import copy
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from split.vision.models import NUM_CLASSES, Block, ClsHead
from split.vision.train import fit


def partition_classes(n_classes: int, capabilities: list[float]) -> list[list[int]]:
    """Classes 0..n_classes-1 split over peers in proportion to their capability (largest remainder,
    at least one class each); each class goes to exactly one peer, in order."""
    n = len(capabilities)
    if not 1 <= n <= n_classes or any(not c > 0 for c in capabilities):
        raise ValueError(f"need 1..{n_classes} peers with positive capabilities, got {capabilities}")
    share = np.asarray(capabilities, float) / sum(capabilities) * (n_classes - n)   # beyond the 1 each
    counts = 1 + np.floor(share).astype(int)
    for i in np.argsort(-(share - np.floor(share)), kind="stable")[: n_classes - counts.sum()]:
        counts[i] += 1
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _blocks(model: nn.Sequential) -> list[Block]:
    return [m for m in model if isinstance(m, Block)]


def importance(full: nn.Sequential, classes: list[int], x: np.ndarray, y: np.ndarray,
               batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: (heads,) and (MLP channels,) scores, sum over the images of `classes` of
    |activation x d loss / d activation| (the full model's cross-entropy on them)."""
    keep = np.isin(y, classes)
    xs, ys = torch.from_numpy(x[keep]), torch.from_numpy(y[keep])
    blocks = _blocks(full)
    heads = [torch.zeros(b.heads) for b in blocks]
    channels = [torch.zeros(b.mlp[0].out_features) for b in blocks]
    acts: dict = {}

    def hooks(i, block):
        def context(_, inputs):          # proj's input: (B, T, heads * head_dim), per head before mixing
            acts["ctx", i] = inputs[0]
            inputs[0].retain_grad()

        def hidden(_, __, out):          # the MLP's hidden activations after GELU: (B, T, channels)
            acts["mlp", i] = out
            out.retain_grad()
        return [block.proj.register_forward_pre_hook(context), block.mlp[1].register_forward_hook(hidden)]

    handles = [h for i, b in enumerate(blocks) for h in hooks(i, b)]
    full.eval()
    try:
        for idx in torch.arange(len(xs)).split(batch):
            loss = F.cross_entropy(full(xs[idx]), ys[idx], reduction="sum")
            full.zero_grad()
            loss.backward()
            for i, b in enumerate(blocks):
                ctx = acts["ctx", i]
                taylor = (ctx * ctx.grad).view(*ctx.shape[:2], b.heads, b.head_dim)     # (B, T, H, hd)
                heads[i] += taylor.sum(dim=(1, 3)).abs().sum(0).detach()
                hid = acts["mlp", i]
                channels[i] += (hid * hid.grad).sum(1).abs().sum(0).detach()             # (channels,)
    finally:
        for h in handles:
            h.remove()
        full.zero_grad()
    return list(zip(heads, channels))


def prune_block(block: Block, keep_heads: list[int], keep_channels: list[int]) -> Block:
    """A block that computes exactly `block` with every other head's and MLP channel's output zeroed."""
    D, H, hd = block.norm1.normalized_shape[0], block.heads, block.head_dim
    out = Block(D, len(keep_heads), hd, len(keep_channels))
    heads, chans = torch.tensor(keep_heads), torch.tensor(keep_channels)
    with torch.no_grad():
        out.norm1.load_state_dict(block.norm1.state_dict())
        out.norm2.load_state_dict(block.norm2.state_dict())
        out.qkv.weight.copy_(block.qkv.weight.view(3, H, hd, D)[:, heads].reshape(-1, D))   # (3 * h' * hd, D)
        out.qkv.bias.copy_(block.qkv.bias.view(3, H, hd)[:, heads].reshape(-1))
        out.proj.weight.copy_(block.proj.weight.view(D, H, hd)[:, heads].reshape(D, -1))     # (D, h' * hd)
        out.proj.bias.copy_(block.proj.bias)
        out.mlp[0].weight.copy_(block.mlp[0].weight[chans])                                 # (c', D)
        out.mlp[0].bias.copy_(block.mlp[0].bias[chans])
        out.mlp[2].weight.copy_(block.mlp[2].weight[:, chans])                              # (D, c')
        out.mlp[2].bias.copy_(block.mlp[2].bias)
    return out


def class_wise_submodel(full: nn.Sequential, classes: list[int], scores, heads: int, hidden: int) -> nn.Sequential:
    """The full ViT with, in every block, the `heads` heads and `hidden` MLP channels that score
    highest for `classes`; its head answers those classes and "other" (started from the full head's
    rows, "other" from the mean of the rest)."""
    stages = OrderedDict()
    blocks = iter(zip(_blocks(full), scores))
    for name, stage in full.named_children():
        if isinstance(stage, Block):
            block, (head_scores, channel_scores) = next(blocks)
            keep_h = sorted(head_scores.topk(min(heads, block.heads)).indices.tolist())
            keep_c = sorted(channel_scores.topk(min(hidden, len(channel_scores))).indices.tolist())
            stages[name] = prune_block(block, keep_h, keep_c)
        elif isinstance(stage, ClsHead):
            stages[name] = _class_head(stage, classes)
        else:
            stages[name] = copy.deepcopy(stage)
    return nn.Sequential(stages).eval()


def _class_head(head: ClsHead, classes: list[int]) -> ClsHead:
    others = [c for c in range(head.fc.out_features) if c not in classes]
    out = ClsHead(head.fc.in_features, len(classes) + 1)
    with torch.no_grad():
        out.norm.load_state_dict(head.norm.state_dict())
        weight, bias = head.fc.weight, head.fc.bias
        out.fc.weight.copy_(torch.cat([weight[classes], weight[others].mean(0, keepdim=True)]))
        out.fc.bias.copy_(torch.cat([bias[classes], bias[others].mean(0, keepdim=True)]))
    return out


def fold(probs: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """(B, n_classes) probabilities -> (B, len(classes) + 1): those classes, then all others summed."""
    mine = probs[:, classes]
    return torch.cat([mine, (1 - mine.sum(1, keepdim=True)).clamp_min(0)], 1)


def fold_labels(y: torch.Tensor, classes: list[int]) -> torch.Tensor:
    index = torch.full((NUM_CLASSES,), len(classes), dtype=torch.long)
    index[torch.tensor(classes)] = torch.arange(len(classes))
    return index[y]


def distill(sub: nn.Sequential, full: nn.Sequential, classes: list[int], x: np.ndarray, y: np.ndarray,
            epochs: int = 6, lr: float = 2e-3, batch: int = 64, temperature: float = 2.0, seed: int = 0,
            desc: str = "distil") -> nn.Sequential:
    """Train `sub` on every image: KL to the full model's folded probabilities (at `temperature`)
    plus cross-entropy on the folded true label."""
    xt, yt = torch.from_numpy(x), fold_labels(torch.from_numpy(y), classes)
    with torch.no_grad():
        full.eval()
        teacher = torch.cat([fold(torch.softmax(full(xt[i:i + 256]) / temperature, 1), classes)
                             for i in range(0, len(xt), 256)])                     # (N, c + 1)

    def loss(idx):
        logits = sub(xt[idx])                                                      # (B, c + 1)
        soft = F.kl_div(F.log_softmax(logits / temperature, 1), teacher[idx], reduction="batchmean")
        return temperature ** 2 * soft + F.cross_entropy(logits, yt[idx])
    return fit(sub, len(xt), loss, epochs, lr, batch, torch.Generator().manual_seed(seed), desc)


class Fusion(nn.Module):
    """(B, sum of (classes + 1) over peers) log-probabilities, zeros where a peer is missing, and
    (B, peers) 1/0 present -> (B, n_classes) logits."""
    def __init__(self, parts: list[list[int]], hidden: int = 64, classes: int = NUM_CLASSES):
        super().__init__()
        width = sum(len(p) + 1 for p in parts) + len(parts)
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, answers: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([answers, present], 1))


def fusion_inputs(outputs: list[torch.Tensor | None], parts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each peer's (B, classes + 1) logits, None where it did not answer -> Fusion's two inputs."""
    B = next(o.shape[0] for o in outputs if o is not None) if any(o is not None for o in outputs) else 1
    answers = [torch.log_softmax(o.float(), 1) if o is not None else torch.zeros(B, len(p) + 1)
               for o, p in zip(outputs, parts)]
    present = torch.tensor([[float(o is not None) for o in outputs]]).expand(B, -1)
    return torch.cat(answers, 1), present.contiguous()


def train_fusion(subs: list[nn.Sequential], parts: list[list[int]], x: np.ndarray, y: np.ndarray,
                 epochs: int = 30, drop: float = 0.25, lr: float = 3e-3, batch: int = 128, seed: int = 0) -> Fusion:
    """The fusion head on the sub-models' answers to the training images; each peer's answer is
    dropped (as if it had not answered) with probability `drop`, per image."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        answers, _ = fusion_inputs([torch.cat([s.eval()(xt[i:i + 256]) for i in range(0, len(xt), 256)])
                                    for s in subs], parts)                           # (N, width)
    widths = torch.tensor([len(p) + 1 for p in parts])
    fusion = Fusion(parts)

    def loss(idx):
        present = (torch.rand(len(idx), len(parts), generator=g) >= drop).float()   # (B, peers)
        mask = torch.repeat_interleave(present, widths, dim=1)                      # (B, width)
        return F.cross_entropy(fusion(answers[idx] * mask, present), yt[idx])
    return fit(fusion, len(xt), loss, epochs, lr, batch, g, "fusion")
