"""Pose-regression model pairs for the 4-DoF pose stream (split.vision.pose; issue 18). Each model is an
`nn.Sequential` of named stages mapping a (B, 1, 96, 96) frame to its normalised pose:

    pose_cnn_small     plain CNN (like frame_small), 2.2 MMAC                 (B,1,96,96) -> (B,5)
    pose_cnn_big       ResNet (like frame_big), 19.9 MMAC                     (B,1,96,96) -> (B,4)
    pose_mobile_small  narrow MobileNetV2 (inverted residuals), 1.6 MMAC      (B,1,96,96) -> (B,5)
    pose_mobile_big    wider, deeper MobileNetV2, 18.7 MMAC                   (B,1,96,96) -> (B,4)

    small, big = (build_pose(n) for n in POSE_PAIRS["mobile"])

Columns 0-3 are (x, y, size, angle) in [0, 1] over pose.POSE_RANGES. A small model's column 4 is its
AUXILIARY output: its own predicted error on this frame (the normalised MAE of columns 0-3, mean over the
4 DoF; >= 0 through a softplus), so a switch can call the big model where the small one expects to be
wrong. It is part of the one output tensor, so an ONNX export carries it in "y" (B, 5). It is trained
after the pose, with everything else frozen (split.vision.train.train_pose_aux).
"""
from collections import OrderedDict

import torch
from torch import nn

from split.vision.models import BasicBlock, conv_bn

POSE_DOF = 4


class PoseHead(nn.Module):
    """(B, C, 6, 6) -> (B, 4) pose from the flattened map (which keeps where the digit is), or (B, 5)
    with `aux`: + the predicted error, from the flattened map, the pose branch's hidden features and
    the pose itself (layer-normalised, one hidden layer, softplus)."""
    def __init__(self, channels: int, hidden: int = 64, aux: bool = False, aux_hidden: int = 64):
        super().__init__()
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(channels * 36, hidden), nn.ReLU())
        self.pose = nn.Linear(hidden, POSE_DOF)
        width = channels * 36 + hidden + POSE_DOF
        self.aux = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, aux_hidden), nn.ReLU(),
                                 nn.Linear(aux_hidden, 1), nn.Softplus()) if aux else None

    def aux_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pose (B, 4), the aux branch's input (B, C*36 + hidden + 4))."""
        h = self.hidden(x)                                                  # (B, hidden)
        pose = self.pose(h)                                                 # (B, 4)
        return pose, torch.cat([x.flatten(1), h, pose], 1)

    def forward(self, x):
        if self.aux is None:
            return self.pose(self.hidden(x))                                # (B, 4)
        pose, z = self.aux_input(x)
        return torch.cat([pose, self.aux(z)], 1)                            # (B, 5)


def pose_cnn_small() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=conv_bn(1, 8, 2),      # (B, 8, 48, 48)
        conv2=conv_bn(8, 24, 2),     # (B, 24, 24, 24)
        conv3=conv_bn(24, 24, 2),    # (B, 24, 12, 12)
        conv4=conv_bn(24, 24, 2),    # (B, 24, 6, 6)
        head=PoseHead(24, 48, aux=True),  # (B, 5)
    ))


def pose_cnn_big() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        stem=conv_bn(1, 16, 2),            # (B, 16, 48, 48)
        stage1=BasicBlock(16, 32, 2),      # (B, 32, 24, 24)
        stage2=BasicBlock(32, 64, 2),      # (B, 64, 12, 12)
        stage3=BasicBlock(64, 64, 2),      # (B, 64, 6, 6)
        head=PoseHead(64, 128),            # (B, 4)
    ))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (x t) -> 3x3 depthwise (stride) -> 1x1 linear projection,
    a residual when the shape is kept. ReLU6 as on integer-only MCUs (GAP8)."""
    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 6):
        super().__init__()
        mid = c_in * expand
        layers = [] if expand == 1 else [nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
        layers += [nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                   nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def stem(c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6())


def pose_mobile_small() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        stem=stem(8),                               # (B, 8, 48, 48)
        block1=InvertedResidual(8, 16, 2, 1),       # (B, 16, 24, 24)
        block2=InvertedResidual(16, 24, 2, 2),      # (B, 24, 12, 12)
        block3=InvertedResidual(24, 24, 1, 2),      # (B, 24, 12, 12)
        block4=InvertedResidual(24, 32, 2, 3),      # (B, 32, 6, 6)
        head=PoseHead(32, 48, aux=True),            # (B, 5)
    ))


def pose_mobile_big() -> nn.Sequential:
    """Wider and deeper; downsampled early (most blocks at 12x12 and 6x6), which keeps CPU training fast."""
    return nn.Sequential(OrderedDict(
        stem=stem(32),                              # (B, 32, 48, 48)
        block1=InvertedResidual(32, 48, 2, 1),      # (B, 48, 24, 24)
        block2=InvertedResidual(48, 64, 2, 2),      # (B, 64, 12, 12)
        block3=InvertedResidual(64, 64, 1, 3),      # (B, 64, 12, 12)
        block4=InvertedResidual(64, 64, 1, 3),      # (B, 64, 12, 12)
        block5=InvertedResidual(64, 128, 2, 3),     # (B, 128, 6, 6)
        block6=InvertedResidual(128, 128, 1, 2),    # (B, 128, 6, 6)
        head=PoseHead(128, 128),                    # (B, 4)
    ))


POSE_BUILDERS = {"pose_cnn_small": pose_cnn_small, "pose_cnn_big": pose_cnn_big,
                 "pose_mobile_small": pose_mobile_small, "pose_mobile_big": pose_mobile_big}
POSE_PAIRS = {"cnn": ("pose_cnn_small", "pose_cnn_big"), "mobile": ("pose_mobile_small", "pose_mobile_big")}
POSE_INPUT = (1, 96, 96)


def has_aux(model: nn.Sequential) -> bool:
    """Whether the model's output carries the auxiliary predicted-error column (B, 5)."""
    return model.head.aux is not None


def build_pose(name: str, seed: int = 0) -> nn.Sequential:
    if name not in POSE_BUILDERS:
        raise ValueError(f"unknown pose model '{name}'; choose one of {', '.join(POSE_BUILDERS)}")
    torch.manual_seed(seed)
    return POSE_BUILDERS[name]()
