"""Staged vision models: each is an `nn.Sequential` of named stages, so a cut is a stage name
or index and `model[:k]` / `model[k:]` are the device head and the cloud tail.

    seq_cnn    plain conv stack                 (B,1,64,64) -> (B,10)
    res_cnn    residual CNN, cut between stages  (B,1,64,64) -> (B,10)
    vit        small ViT (patch 8, dim 64)       (B,1,64,64) -> (B,10)
    efficientformer  EfficientFormer (split.vision.efficientformer)  (B,1,64,64) -> (B,10)
    fastvit    MobileCLIP's FastViT (split.vision.fastvit), train-time branches; fastvit.reparameterize
               gives the same function as single convs   (B,1,64,64) -> (B,10)
    frame_small / frame_big   frame-stream CNNs  (B,1,96,96) -> (B,12): 10 class logits + (x, y)
"""
import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from split.vision.efficientformer import efficientformer
from split.vision.fastvit import fastvit

NUM_CLASSES = 10


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Sequential):
    """Global average pool + linear: (B, C, H, W) -> (B, classes)."""
    def __init__(self, channels: int, classes: int = NUM_CLASSES):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def seq_cnn() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=conv_bn(1, 16, 2),    # (B, 16, 32, 32)
        conv2=conv_bn(16, 32, 2),   # (B, 32, 16, 16)
        conv3=conv_bn(32, 64, 2),   # (B, 64, 8, 8)
        conv4=conv_bn(64, 64, 2),   # (B, 64, 4, 4)
        classifier=Classifier(64),  # (B, 10)
    ))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection on the shortcut when the shape changes."""
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def res_cnn() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        stem=conv_bn(1, 16, 2),             # (B, 16, 32, 32)
        stage1=BasicBlock(16, 16),          # (B, 16, 32, 32)
        stage2=BasicBlock(16, 32, 2),       # (B, 32, 16, 16)
        stage3=BasicBlock(32, 64, 2),       # (B, 64, 8, 8)
        stage4=BasicBlock(64, 64, 2),       # (B, 64, 4, 4)
        classifier=Classifier(64),          # (B, 10)
    ))


class PatchEmbed(nn.Module):
    """(B, 1, 64, 64) -> (B, 1 + 64, dim): 8x8 patches, a class token, learned positions."""
    def __init__(self, dim: int, patch: int = 8, image: int = 64):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)                 # (B, N, D)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos   # (B, 1+N, D)


class Block(nn.Module):
    """Pre-norm transformer block, attention written out (exports to plain ONNX ops). `head_dim` and
    `hidden` default to dim // heads and 2 * dim; a class-wise pruned block (split.vision.edvit)
    keeps fewer heads and MLP channels at the same dim."""
    def __init__(self, dim: int, heads: int, head_dim: int | None = None, hidden: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim or dim // heads
        inner, hidden = heads * self.head_dim, hidden or 2 * dim
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * inner), nn.Linear(inner, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):                                            # (B, T, D)
        B, T, _ = x.shape
        H, hd = self.heads, self.head_dim
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)   # 3 x (B, H, T, hd)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1)               # (B, H, T, T)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, H * hd))
        return x + self.mlp(self.norm2(x))


class ClsHead(nn.Module):
    """(B, T, D) -> (B, classes) from the class token."""
    def __init__(self, dim: int, classes: int = NUM_CLASSES):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(self.norm(x[:, 0]))


def vit(dim: int = 64, depth: int = 4, heads: int = 4) -> nn.Sequential:
    stages = {"embed": PatchEmbed(dim)}
    stages.update({f"block{i + 1}": Block(dim, heads) for i in range(depth)})   # (B, 65, 64)
    stages["head"] = ClsHead(dim)
    return nn.Sequential(OrderedDict(stages))


class FrameHead(nn.Module):
    """(B, C, 6, 6) -> (B, 12): class logits from max-pooled features (wherever the digit is),
    (x, y) from the flattened map (which keeps where it is)."""
    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.cls = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, NUM_CLASSES))
        self.xy = nn.Sequential(nn.Flatten(), nn.Linear(channels * 36, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x):
        return torch.cat([self.cls(x), self.xy(x)], 1)          # (B, 12)


def frame_small() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=conv_bn(1, 8, 2),      # (B, 8, 48, 48)
        conv2=conv_bn(8, 24, 2),     # (B, 24, 24, 24)
        conv3=conv_bn(24, 24, 2),    # (B, 24, 12, 12)
        conv4=conv_bn(24, 24, 2),    # (B, 24, 6, 6)
        head=FrameHead(24, 48),      # (B, 12)
    ))


def frame_big() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        stem=conv_bn(1, 16, 2),            # (B, 16, 48, 48)
        stage1=BasicBlock(16, 32, 2),      # (B, 32, 24, 24)
        stage2=BasicBlock(32, 64, 2),      # (B, 64, 12, 12)
        stage3=BasicBlock(64, 64, 2),      # (B, 64, 6, 6)
        head=FrameHead(64, 128),           # (B, 12)
    ))


BUILDERS = {"seq_cnn": seq_cnn, "res_cnn": res_cnn, "vit": vit, "frame_small": frame_small, "frame_big": frame_big,
            "efficientformer": partial(efficientformer, NUM_CLASSES), "fastvit": partial(fastvit, NUM_CLASSES)}
INPUT_SHAPES = {"seq_cnn": (1, 64, 64), "res_cnn": (1, 64, 64), "vit": (1, 64, 64),
                "efficientformer": (1, 64, 64), "fastvit": (1, 64, 64),
                "frame_small": (1, 96, 96), "frame_big": (1, 96, 96)}


def build(name: str, seed: int = 0) -> nn.Sequential:
    if name not in BUILDERS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    return BUILDERS[name]()
