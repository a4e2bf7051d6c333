"""A small split deployment the tests build themselves (untrained weights: the tests check
plumbing and exactness, not accuracy)."""
from pathlib import Path

import torch

from split.vision.bottleneck import Bottleneck
from split.vision.deploy import build_deployment
from split.vision.exits import attach_exits
from split.vision.models import build


def deploy_res_cnn(root: Path):
    torch.manual_seed(0)
    backbone = build("res_cnn").eval()
    example = torch.rand(1, 1, 64, 64)
    net = attach_exits(backbone, ["stage1", "stage2"], example).eval()
    with torch.no_grad():
        activation = backbone[:3](example)
    bn = Bottleneck.at(activation, 4).eval()
    device = build_deployment(net, "res_cnn", root / "device", root / "repository", (1, 64, 64),
                              bottlenecks={("stage2", 4): bn}, cuts=["stage2"])
    return device, root / "repository", net, bn
