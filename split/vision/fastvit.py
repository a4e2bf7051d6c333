"""FastViT (Vasu et al. 2023, "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization") as MobileCLIP's image encoders (MCi) use it, written out in plain PyTorch and
sized for the 64x64 digits, as a staged `nn.Sequential` (split.vision.models):

    model = fastvit(10)                   # (B, 1, 64, 64) -> (B, 10), train-time branches
    fast = reparameterize(model.eval())   # the same function as single convs, for export

    stem    MobileOne 3x3 s2, depthwise 3x3 s2, 1x1 (GELU)     (B, 1, 64, 64) -> (B, 16, 16, 16)
    stage1  RepMixer block x1                                  (B, 16, 16, 16)
    stage2  patch embedding (7x7 s2 large kernel + 1x1), x1    (B, 32, 8, 8)
    stage3  patch embedding, RepMixer block x2                 (B, 64, 4, 4)
    stage4  conditional positional encoding (7x7), attention block x1   (B, 64, 4, 4)
    head    MobileOne depthwise 3x3 to 2x channels, pool, linear        (B, 10)

Every block is reparameterizable (MobileOne / RepVGG style): at train time a conv is a sum of
branches (k x k conv + BN, 1x1 conv + BN, BN on the identity), a large kernel has a 3x3 branch
beside it, RepMixer is x + scale * (mixer(x) - norm(x)) with depthwise conv branches, the
positional encoding is x + depthwise conv(x), and the attention block's BatchNorm and layer scales
sit beside linear maps. Each has `fused()`: one module that computes the same function in eval
mode, from plain convs and linears; `reparameterize(model)` swaps them all into a copy.

Changed for a 64x64 input: the attention stage keeps the third stage's width and 4x4 resolution
(no patch embedding: 16 tokens instead of 2x2), MCi's squeeze-excitation in the late patch
embeddings and the head is left out, and the widths and depths are far smaller than MCi0's.
Training as in the paper: layer scale on every residual branch and stochastic depth; the layer scales
start at 1 (not 1e-5) for our short schedules. ED-ViT's class-wise pruning is not wired to this model,
for the reasons split.vision.efficientformer gives for EfficientFormer.
"""
import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from split.vision.efficientformer import DropPath


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of conv(kernel, no bias) followed by `bn` in eval mode."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()                           # (C_out,)
    return kernel * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def identity_kernel(channels: int, groups: int, k: int) -> torch.Tensor:
    """The k x k kernel of a (grouped) conv that copies its input: (C, C / groups, k, k)."""
    kernel = torch.zeros(channels, channels // groups, k, k)
    kernel[torch.arange(channels), torch.arange(channels) % (channels // groups), k // 2, k // 2] = 1
    return kernel


def plain_conv(kernel: torch.Tensor, bias: torch.Tensor, stride=1, groups: int = 1) -> nn.Conv2d:
    """A conv with this (C_out, C_in / groups, k, k) kernel and bias, padded to keep the size at stride 1."""
    c_out, per_group, k, _ = kernel.shape
    conv = nn.Conv2d(per_group * groups, c_out, k, stride, k // 2, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


def branch_kernel(branch: nn.Sequential, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv + BN branch as (kernel padded to k x k, bias)."""
    kernel, bias = fold_bn(branch[0].weight, branch[1])
    pad = (k - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4), bias


class MobileOne(nn.Module):
    """act(sum of `branches` k x k conv + BN, a 1x1 conv + BN (k > 1, `scale`), and BN of the input
    (same shape, stride 1))."""
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, branches: int = 1,
                 scale: bool = True, act: bool = True):
        super().__init__()
        self.convs = nn.ModuleList([conv_bn(c_in, c_out, k, stride, groups) for _ in range(branches)])
        self.scale = conv_bn(c_in, c_out, 1, stride, groups) if k > 1 and scale else None
        self.identity = nn.BatchNorm2d(c_out) if c_in == c_out and stride == 1 else None
        self.act = nn.GELU() if act else nn.Identity()
        self.k, self.groups, self.stride, self.c_in, self.c_out = k, groups, stride, c_in, c_out

    def forward(self, x):
        out = sum(branch(x) for branch in self.convs)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = torch.zeros(self.c_out, self.c_in // self.groups, self.k, self.k), torch.zeros(self.c_out)
        for branch in [*self.convs, *([self.scale] if self.scale is not None else [])]:
            kb, bb = branch_kernel(branch, self.k)
            kernel, bias = kernel + kb, bias + bb
        if self.identity is not None:
            kb, bb = fold_bn(identity_kernel(self.c_out, self.groups, self.k), self.identity)
            kernel, bias = kernel + kb, bias + bb
        return kernel, bias

    def fused(self) -> nn.Module:
        conv = plain_conv(*self.kernel_bias(), self.stride, self.groups)
        return conv if isinstance(self.act, nn.Identity) else nn.Sequential(conv, self.act)


class LargeKernel(nn.Module):
    """act(k x k conv + BN plus a 3x3 conv + BN beside it) (RepLKNet)."""
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, groups: int):
        super().__init__()
        self.large, self.small = conv_bn(c_in, c_out, k, stride, groups), conv_bn(c_in, c_out, 3, stride, groups)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.large(x) + self.small(x))

    def fused(self) -> nn.Module:
        k = self.large[0].kernel_size[0]
        (kl, bl), (ks, bs) = branch_kernel(self.large, k), branch_kernel(self.small, k)
        return nn.Sequential(plain_conv(kl + ks, bl + bs, self.large[0].stride, self.large[0].groups), self.act)


class RepMixer(nn.Module):
    """x + scale * (mixer(x) - norm(x)), mixer and norm depthwise 3x3 MobileOne branches (no act)."""
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.mixer = MobileOne(dim, dim, 3, groups=dim, act=False)
        self.norm = MobileOne(dim, dim, 3, groups=dim, branches=0, scale=False, act=False)
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):                                           # (B, C, H, W)
        return x + self.gamma.view(-1, 1, 1) * (self.mixer(x) - self.norm(x))

    def fused(self) -> nn.Conv2d:
        (km, bm), (kn, bn) = self.mixer.kernel_bias(), self.norm.kernel_bias()
        dim = len(self.gamma)
        kernel = identity_kernel(dim, dim, 3) + self.gamma.view(-1, 1, 1, 1) * (km - kn)
        return plain_conv(kernel, self.gamma * (bm - bn), 1, dim)


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv + BN, 1x1 expand, GELU, 1x1 project, times the block's layer scale."""
    def __init__(self, dim: int, ratio: float, init: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.dw = conv_bn(dim, dim, 7, groups=dim)
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):                                           # (B, C, H, W)
        return self.fc2(self.act(self.fc1(self.dw(x)))) * self.gamma.view(-1, 1, 1)

    def fused(self) -> nn.Sequential:
        fc2 = plain_conv(self.fc2.weight * self.gamma.view(-1, 1, 1, 1), self.fc2.bias * self.gamma)
        dw = plain_conv(*branch_kernel(self.dw, 7), 1, self.dw[0].groups)
        return nn.Sequential(dw, copy.deepcopy(self.fc1), self.act, fc2)


class Residual(nn.Module):
    def __init__(self, body: nn.Module, drop: float):
        super().__init__()
        self.body, self.drop = body, DropPath(drop)

    def forward(self, x):
        return x + self.drop(self.body(x))


class RepMixerBlock(nn.Sequential):
    """Token mixing by RepMixer, then x + ConvFFN(x)."""
    def __init__(self, dim: int, ratio: float, init: float, drop: float):
        super().__init__(RepMixer(dim, init), Residual(ConvFFN(dim, ratio, init), drop))


class PosEncoding(nn.Module):
    """Conditional positional encoding: x + depthwise 7x7 conv(x)."""
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)

    def forward(self, x):
        return x + self.conv(x)

    def fused(self) -> nn.Conv2d:
        dim = self.conv.in_channels
        return plain_conv(identity_kernel(dim, dim, 7) + self.conv.weight, self.conv.bias, 1, dim)


class Attention(nn.Module):
    """scale * MHSA(BN(x)) over the side x side positions: (B, C, side, side) -> the same. Shapes are
    the module's own numbers (only the batch is read from the input), so an export has no shape
    arithmetic. fused() folds the BatchNorm into qkv and the layer scale into proj."""
    def __init__(self, dim: int, side: int, head_dim: int, init: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.dim, self.side, self.heads, self.head_dim = dim, side, dim // head_dim, head_dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def attention_macs(self, x: torch.Tensor) -> int:
        """q @ k^T and att @ v for one image (split.vision.flops)."""
        return 2 * self.side ** 4 * self.dim

    def forward(self, x):
        C, N, h, hd = self.dim, self.side ** 2, self.heads, self.head_dim
        t = self.norm(x).reshape(-1, C, N).transpose(1, 2)                        # (B, N, C)
        q, k, v = self.qkv(t).split(C, -1)                                        # 3 x (B, N, C)
        q, v = (a.reshape(-1, N, h, hd).transpose(1, 2) for a in (q, v))          # (B, h, N, hd)
        k = k.reshape(-1, N, h, hd).permute(0, 2, 3, 1)                           # (B, h, hd, N)
        att = torch.softmax(q @ k * hd ** -0.5, -1)                               # (B, h, N, N)
        out = self.proj((att @ v).transpose(1, 2).reshape(-1, N, C))              # (B, N, C)
        out = out if self.gamma is None else out * self.gamma
        return out.transpose(1, 2).reshape(-1, C, self.side, self.side)

    def fused(self) -> "Attention":
        out = copy.deepcopy(self)
        if self.gamma is None:                                      # fused already
            return out
        scale = self.norm.weight / (self.norm.running_var + self.norm.eps).sqrt()
        shift = self.norm.bias - self.norm.running_mean * scale
        out.norm = nn.Identity()
        out.qkv = nn.Linear(self.qkv.in_features, self.qkv.out_features)
        out.proj = nn.Linear(self.proj.in_features, self.proj.out_features)
        with torch.no_grad():
            out.qkv.weight.copy_(self.qkv.weight * scale)                      # W diag(s)
            out.qkv.bias.copy_(self.qkv.weight @ shift)                        # W t
            out.proj.weight.copy_(self.proj.weight * self.gamma[:, None])
            out.proj.bias.copy_(self.proj.bias * self.gamma)
        out.gamma = None
        return out


class AttentionBlock(nn.Sequential):
    def __init__(self, dim: int, side: int, ratio: float, init: float, drop: float, head_dim: int):
        super().__init__(Residual(Attention(dim, side, head_dim, init), drop),
                         Residual(ConvFFN(dim, ratio, init), drop))


def patch_embed(c_in: int, c_out: int) -> nn.Sequential:
    """Downsampling between stages: 7x7 s2 large kernel (grouped by input channel), then 1x1."""
    return nn.Sequential(LargeKernel(c_in, c_out, 7, 2, c_in), MobileOne(c_out, c_out, 1))


class Head(nn.Module):
    """MobileOne depthwise 3x3 to 2x channels (GELU), global average pool, linear."""
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.conv = MobileOne(dim, 2 * dim, 3, groups=dim)
        self.fc = nn.Linear(2 * dim, classes)

    def forward(self, x):                                           # (B, C, H, W) -> (B, classes)
        return self.fc(self.conv(x).mean((2, 3)))


def fastvit(classes: int, widths=(16, 32, 64), depths=(1, 1, 2, 1), mlp_ratio: float = 3.0, head_dim: int = 32,
            layer_scale: float = 1.0, drop_path: float = 0.1, image: int = 64) -> nn.Sequential:
    """`layer_scale` starts at 1 (the paper: 1e-5, for 300 ImageNet epochs; ours train for tens)."""
    c1, c2, c3 = widths
    blocks = lambda dim, n: [RepMixerBlock(dim, mlp_ratio, layer_scale, drop_path) for _ in range(n)]  # noqa: E731
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(MobileOne(1, c1, 3, 2), MobileOne(c1, c1, 3, 2, groups=c1),
                           MobileOne(c1, c1, 1)),                                        # (B, c1, 16, 16)
        stage1=nn.Sequential(*blocks(c1, depths[0])),                                    # (B, c1, 16, 16)
        stage2=nn.Sequential(patch_embed(c1, c2), *blocks(c2, depths[1])),               # (B, c2, 8, 8)
        stage3=nn.Sequential(patch_embed(c2, c3), *blocks(c3, depths[2])),               # (B, c3, 4, 4)
        stage4=nn.Sequential(PosEncoding(c3), *[                                         # (B, c3, 4, 4)
            AttentionBlock(c3, image // 16, mlp_ratio, layer_scale, drop_path, head_dim) for _ in range(depths[3])]),
        head=Head(c3, classes),                                                          # (B, classes)
    ))


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) with every reparameterizable part replaced by its fused
    form: the same outputs in eval mode, single convs instead of branches."""
    out = copy.deepcopy(model).eval()

    def swap(module: nn.Module):
        for name, child in module.named_children():
            if hasattr(child, "fused"):
                setattr(module, name, child.fused().eval())
            else:
                swap(child)
    swap(out)
    return out
