"""Multiply-accumulates of a forward pass, counted with hooks on Conv2d and Linear (the ViT's
attention products are added by the Block hook, other attention modules' by their own
`attention_macs(input)`: split.vision.efficientformer, split.vision.fastvit). Batch 1.

    macs(model, torch.rand(1, 1, 64, 64))     # int
"""
import torch
from torch import nn

from split.vision.models import Block


@torch.no_grad()
def macs(module: nn.Module, example: torch.Tensor) -> int:
    total = [0]

    def conv(m, inp, out):
        total[0] += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += out.numel() // out.shape[0] * m.in_features

    def block(m, inp, out):
        t = inp[0].shape[1]
        total[0] += 2 * t * t * m.heads * m.head_dim               # q @ k^T and att @ v

    def attention(m, inp, out):
        total[0] += m.attention_macs(inp[0])

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, Block):
            hooks.append(m.register_forward_hook(block))
        elif hasattr(m, "attention_macs"):
            hooks.append(m.register_forward_hook(attention))
    try:
        module.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return total[0]
