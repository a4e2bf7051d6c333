"""Cut a staged model into the device head and the cloud tail.

    head, tail = cut(model, "stage2", example)   # or an index: cut(model, 3, example)

`model` is an `nn.Sequential` of named stages (split.vision.models); the cut goes *after* the
named stage (or after the first `at` stages). The shapes are checked by running `example`
through both halves: the tail must accept the head's output and give the whole model's shape.
"""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Split:
    head: nn.Sequential
    tail: nn.Sequential
    index: int                    # stages in the head
    name: str                     # last stage in the head
    activation_shape: tuple       # head output for one example, batch included

    @property
    def activation_bytes_fp32(self) -> int:
        n = 1
        for d in self.activation_shape[1:]:
            n *= d
        return 4 * n


def stage_names(model: nn.Sequential) -> list[str]:
    return [name for name, _ in model.named_children()]


def cut_index(model: nn.Sequential, at) -> int:
    """Stages in the head for a cut after stage `at` (name) or after the first `at` stages (int)."""
    names = stage_names(model)
    if isinstance(at, str):
        if at not in names:
            raise ValueError(f"cut point '{at}' is not a stage; the model has {', '.join(names)}")
        return names.index(at) + 1
    if not isinstance(at, int) or not 1 <= at < len(names):
        raise ValueError(f"cut index {at!r} must be 1..{len(names) - 1} (stages: {', '.join(names)})")
    return at


@torch.no_grad()
def cut(model: nn.Sequential, at, example: torch.Tensor) -> Split:
    k = cut_index(model, at)
    if k == len(model):
        raise ValueError(f"a cut after the last stage '{stage_names(model)[-1]}' leaves no tail")
    head, tail = model[:k], model[k:]
    was_training = model.training
    model.eval()
    try:
        activation = head(example)
        out, whole = tail(activation), model(example)
    except RuntimeError as err:
        raise ValueError(f"cut after '{stage_names(model)[k - 1]}': shapes do not chain: {err}") from None
    finally:
        model.train(was_training)
    if out.shape != whole.shape:
        raise ValueError(f"cut after '{stage_names(model)[k - 1]}': tail gives {tuple(out.shape)}, "
                         f"the whole model {tuple(whole.shape)}")
    return Split(head, tail, k, stage_names(model)[k - 1], tuple(activation.shape))
