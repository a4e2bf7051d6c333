"""Training recipes (CPU-sized): joint exit training, the BottleFit two-stage bottleneck, and
the frame-stream models. Each shows a progress bar; seeds are fixed.

    train_exit_net(net, x, y, epochs=8)
    fit(module, n, batch_loss, epochs, lr, batch, g, desc)   # the loop the recipes share
    train_bottleneck(backbone, k, bn, x, y)          # stage 1 distil, stage 2 fine-tune
    train_frame_model(model, stream, epochs=8)
    train_pose_model(model, frames, pose, epochs=10)  # pose models: L1 on the normalised 4-DoF pose
    train_pose_aux(model, frames, pose)               # small pose models, stage 2: the predicted-error output
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from split.vision.bottleneck import Bottleneck, fake_quantize
from split.vision.exits import EarlyExitNet


def batches(n: int, size: int, g: torch.Generator):
    return torch.randperm(n, generator=g).split(size)


def _sgd(params, epochs: int, steps: int, lr: float):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps, pct_start=0.2)
    return opt, sched


def fit(module: nn.Module, n: int, batch_loss, epochs: int, lr: float, batch: int, g: torch.Generator,
        desc: str, params=None) -> nn.Module:
    """The loop the recipes share: AdamW with a one-cycle schedule over `epochs` of n samples shuffled
    into batches by `g`; batch_loss(idx) -> the loss of the samples idx (a 1-D index tensor)."""
    steps = (n + batch - 1) // batch
    opt, sched = _sgd(module.parameters() if params is None else params, epochs, steps, lr)
    module.train()
    for _ in (bar := tqdm(range(epochs), desc=desc, unit="epoch")):
        total = 0.0
        for idx in batches(n, batch, g):
            loss = batch_loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / n:.3f}")
    return module.eval()


def train_exit_net(net: EarlyExitNet, x: np.ndarray, y: np.ndarray, epochs: int = 8, lr: float = 3e-3,
                   exit_weight: float = 0.5, batch: int = 64, seed: int = 0, desc: str = "train") -> EarlyExitNet:
    """BranchyNet joint training: loss = final CE + exit_weight * sum of exit CEs."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def loss(idx):
        outputs = net(xt[idx])                                     # [(B, 10)] per exit + final
        return F.cross_entropy(outputs[-1], yt[idx]) + exit_weight * sum(
            F.cross_entropy(o, yt[idx]) for o in outputs[:-1])
    return fit(net, len(xt), loss, epochs, lr, batch, torch.Generator().manual_seed(seed), desc)


@torch.no_grad()
def predict(module: nn.Module, x: np.ndarray, batch: int = 256):
    """Outputs of `module` on x in batches; a list of outputs stays a list (exits)."""
    module.eval()
    chunks = [module(torch.from_numpy(x[i:i + batch])) for i in range(0, len(x), batch)]
    if isinstance(chunks[0], (list, tuple)):
        return [torch.cat([c[j] for c in chunks]).numpy() for j in range(len(chunks[0]))]
    return torch.cat(chunks).numpy()


def train_bottleneck(backbone: nn.Sequential, k: int, bn: Bottleneck, x: np.ndarray, y: np.ndarray,
                     distil_epochs: int = 4, finetune_epochs: int = 4, levels: int = 255, lr: float = 3e-3,
                     batch: int = 64, seed: int = 0) -> tuple[Bottleneck, nn.Sequential]:
    """BottleFit's two stages for a cut after the first k stages. Returns the trained bottleneck
    and a fine-tuned copy of the tail (the original backbone is left as it was).

    1. distil: the head is frozen; encoder+decoder learn to reproduce the head's activation (MSE).
    2. fine-tune: head and encoder frozen (the device part is final); decoder + tail learn the task
       (cross-entropy plus distillation from the unsplit model's logits), with the codec's
       quantization simulated on the wire tensor (`levels`: 255 int8, 15 int4).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head, teacher_tail = backbone[:k].eval(), backbone[k:].eval()
    tail = copy.deepcopy(teacher_tail)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        acts = torch.cat([head(xt[i:i + 256]) for i in range(0, len(xt), 256)])        # (N, C, H, W)
        teacher = torch.cat([teacher_tail(acts[i:i + 256]) for i in range(0, len(acts), 256)])   # (N, 10)
    fit(bn, len(xt), lambda idx: F.mse_loss(bn(acts[idx]), acts[idx]), distil_epochs, lr, batch, g,
        f"bottleneck b{bn.channels} distil")
    bn.encoder.eval().requires_grad_(False)

    def finetune_loss(idx):
        with torch.no_grad():
            z = bn.encoder(acts[idx])
        logits = tail(bn.decoder(fake_quantize(z, levels)))
        return F.cross_entropy(logits, yt[idx]) + F.kl_div(
            F.log_softmax(logits, -1), F.softmax(teacher[idx], -1), reduction="batchmean")
    fit(nn.ModuleList([bn.decoder, tail]), len(xt), finetune_loss, finetune_epochs, lr / 3, batch, g,
        f"bottleneck b{bn.channels} fine-tune")
    return bn.eval(), tail.eval()


def frame_loss(out: torch.Tensor, labels: torch.Tensor, xy: torch.Tensor, xy_weight: float = 20.0):
    """(B, 12) outputs: class cross-entropy + weighted MSE of the (x, y) centre."""
    return F.cross_entropy(out[:, :10], labels) + xy_weight * F.mse_loss(out[:, 10:], xy)


def train_frame_model(model: nn.Sequential, frames: np.ndarray, labels: np.ndarray, xy: np.ndarray,
                      epochs: int = 8, lr: float = 3e-3, batch: int = 64, seed: int = 0, desc: str = "frames"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt, pt = torch.from_numpy(frames), torch.from_numpy(labels), torch.from_numpy(xy)
    return fit(model, len(xt), lambda idx: frame_loss(model(xt[idx]), yt[idx], pt[idx]), epochs, lr, batch, g, desc)


def train_pose_model(model: nn.Sequential, frames: np.ndarray, pose: np.ndarray, epochs: int = 10, lr: float = 3e-3,
                     batch: int = 64, seed: int = 0, channels_last: bool = False, desc: str = "pose") -> nn.Sequential:
    """Pose regression (split.vision.pose_models): L1 loss on output columns 0-3 against the normalised
    pose (N, 4). A small model's aux branch (head.aux) is left out here (see train_pose_aux).
    `channels_last` trains in that memory format (faster for depthwise convs on CPU); the model
    comes back contiguous."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    xt, pt = torch.from_numpy(frames), torch.from_numpy(pose)
    params = [p for name, p in model.named_parameters() if not name.startswith("head.aux.")]
    fit(model, len(xt), lambda idx: F.l1_loss(model(xt[idx].contiguous(memory_format=fmt))[:, :4], pt[idx]),
        epochs, lr, batch, g, desc, params)
    return model.to(memory_format=torch.contiguous_format).eval()


def train_pose_aux(model: nn.Sequential, frames: np.ndarray, pose: np.ndarray, epochs: int = 30, lr: float = 3e-3,
                   batch: int = 128, seed: int = 0, desc: str = "pose aux") -> nn.Sequential:
    """Second stage for a small pose model: everything but the aux branch is frozen (and in eval
    mode); the aux branch (model.head.aux) learns to predict the model's own per-frame error, the mean
    over the 4 DoF of |pose - true| (normalised), by MSE. Give it TRAINING-split frames that stage 1
    did not see (e.g. pose_frames_iid("train", n, draw=1)), so the targets are unseen-frame errors."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = model.head
    model.eval()
    with torch.no_grad():                                         # frozen: the aux inputs once
        xt = torch.from_numpy(frames)
        parts = [head.aux_input(model[:-1](xt[i:i + 256])) for i in range(0, len(xt), 256)]
        pred = torch.cat([p for p, _ in parts])                                   # (N, 4)
        z = torch.cat([a for _, a in parts])                                      # (N, hidden + 4 + C)
        err = (pred - torch.from_numpy(pose)).abs().mean(1, keepdim=True)         # (N, 1)
    fit(head.aux, len(z), lambda idx: F.mse_loss(head.aux(z[idx]), err[idx]), epochs, lr, batch, g, desc)
    return model.eval()
