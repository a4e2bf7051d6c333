"""Trained models, cached as safetensors under .cache/split/weights (trained on first use).

    net = exit_net("res_cnn")            # EarlyExitNet, trained jointly with its exits; FastViT's
                                         # backbone comes back reparameterized (split.vision.fastvit)
    bn, tail = bottleneck("res_cnn", "stage2", 8)
    small, big = frame_model("frame_small"), frame_model("frame_big")
    small, big = pose_model("pose_mobile_small"), pose_model("pose_mobile_big")   # issue 18's pose pairs

The cache key names the recipe version; bump RECIPES[...] when a recipe or an architecture changes.
"""
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from split.vision import data, pose
from split.vision.bottleneck import Bottleneck
from split.vision.cut import cut_index
from split.vision.exits import attach_exits
from split.vision.fastvit import reparameterize
from split.vision.models import INPUT_SHAPES, build
from split.vision.pose_models import build_pose, has_aux
from split.vision.train import train_bottleneck, train_exit_net, train_frame_model, train_pose_aux, train_pose_model

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "split" / "weights"
RECIPES = {"exits": "v2", "bottleneck": "v2", "frame_small": "v3", "frame_big": "v2",
           "pose_cnn_small": "v1", "pose_cnn_big": "v1", "pose_mobile_small": "v2", "pose_mobile_big": "v2"}
EXITS = {"seq_cnn": ["conv2"], "res_cnn": ["stage1", "stage2"], "vit": ["block1", "block2"],
         "efficientformer": ["stage1", "stage2"], "fastvit": ["stage1", "stage2"]}
EPOCHS = {"seq_cnn": 8, "res_cnn": 8, "vit": 30, "efficientformer": 30, "fastvit": 30}
FRAMES = 12000
FRAME_EPOCHS = {"frame_small": 20, "frame_big": 12}
# Each pair shares one recipe (frames, epochs, lr), sized so its big model trains in about 6-7 min on 2 CPU
# cores; channels_last speeds up the big MobileNet's depthwise convs there.
POSE_FRAMES, POSE_AUX_FRAMES, POSE_AUX_EPOCHS = 24000, 30000, 60
POSE_RECIPE = {"pose_cnn_small": (12, 3e-3, False), "pose_cnn_big": (12, 3e-3, False),     # (epochs, lr, channels_last)
               "pose_mobile_small": (9, 8e-3, False), "pose_mobile_big": (9, 8e-3, True)}


def cached(path: Path, module: torch.nn.Module, train) -> torch.nn.Module:
    if path.exists():
        load_model(module, str(path))
        return module.eval()
    train()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(module, str(path))
    return module.eval()


def exit_net(name: str):
    example = torch.rand(1, *INPUT_SHAPES[name])
    net = attach_exits(build(name), EXITS[name], example)
    x, y = data.digits("train")
    net = cached(CACHE / f"{name}_exits_{RECIPES['exits']}.safetensors", net,
                 lambda: train_exit_net(net, x, y, epochs=EPOCHS[name], desc=f"{name} + exits"))
    net.backbone = reparameterize(net.backbone)       # the inference form (a plain copy for most models)
    return net


def bottleneck(name: str, stage: str, channels: int, levels: int = 255):
    """The trained bottleneck at a cut and its fine-tuned tail (the backbone comes from exit_net)."""
    net = exit_net(name)
    k = cut_index(net.backbone, stage)
    with torch.no_grad():
        activation = net.backbone[:k](torch.rand(1, *INPUT_SHAPES[name]))
    bn = Bottleneck.at(activation, channels)
    tail = reparameterize(build(name))[k:]                # the structure of exit_net's backbone
    holder = torch.nn.ModuleDict({"bn": bn, "tail": tail})
    x, y = data.digits("train")

    def train():
        trained_bn, trained_tail = train_bottleneck(net.backbone, k, bn, x, y, levels=levels)
        tail.load_state_dict(trained_tail.state_dict())
    cached(CACHE / f"{name}_{stage}_b{channels}_q{levels}_{RECIPES['bottleneck']}.safetensors", holder, train)
    return bn.eval(), tail.eval()


def frame_model(name: str):
    model = build(name)
    s = data.frames_iid("train", FRAMES)
    return cached(CACHE / f"{name}_{RECIPES[name]}.safetensors", model,
                   lambda: train_frame_model(model, s.frames, s.labels, s.xy, epochs=FRAME_EPOCHS[name], desc=name))


def pose_model(name: str):
    """A trained pose model (split.vision.pose_models) on pose_frames_iid("train", POSE_FRAMES); a small
    model's aux output is then trained on an independent draw of training frames (train_pose_aux)."""
    model = build_pose(name)

    def train():
        s = pose.pose_frames_iid("train", POSE_FRAMES)
        epochs, lr, channels_last = POSE_RECIPE[name]
        train_pose_model(model, s.frames, s.pose, epochs=epochs, lr=lr, channels_last=channels_last, desc=name)
        if has_aux(model):
            a = pose.pose_frames_iid("train", POSE_AUX_FRAMES, draw=1)
            train_pose_aux(model, a.frames, a.pose, epochs=POSE_AUX_EPOCHS, desc=f"{name} aux")
    return cached(CACHE / f"{name}_{RECIPES[name]}.safetensors", model, train)
