"""The modules split.llama.quantize's handlers build: y = x @ W^T + bias on torch's packed CPU kernels,
W never dequantized on the hot path. Each holds only its kernel's tensors (non-persistent buffers, so
a pager can bind a block's tensors into them); the stored form is quantize.py's.

  WeightOnlyInt8Linear       aten._weight_int8pack_mm: int8 (out, in), one scale per output row
  WeightOnlyInt4Linear       aten._weight_int4pack_mm_for_cpu: 4-bit codes in the kernel's (machine-
                             specific) packed layout, a scale and a float zero per group of input columns
  WeightOnlyInt8GroupLinear  group-wise int8 on that same int4 kernel (pack_int8_groups): each code q is
                             split into two nibbles, q + 128 = 16 h + l, so w = s q = 16 s (h - 8) + s (l - 8) + 8 s;
                             the weight (out, 2 in) is [h | l] with scale 16 s, zero 0 on the h groups and
                             scale s, zero 8 s on the l ones, and the activation is [x | x]. 16 s and 8 s are
                             exact in bf16 and the kernel forms (c - 8) * scale + zero in fp32, exactly
                             q * s, so the result is a float matmul of the dequantized weight (fp32
                             accumulation, bf16 output), at twice the int4 kernel's work.

Activations are cast to the scales' dtype (the compute dtype, bf16 by default: both kernels take a
slow path with fp32 activations) for the matmul and the result back to the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, contiguous and 64-byte aligned (copied if not). The bf16 path of _weight_int8pack_mm crashes
    (SIGSEGV) on a weight or activation at an unaligned address once M >= 4: a slice, or a tensor
    read from a safetensors file, may be one."""
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 (any integer dtype) -> the int4 kernel's packed uint8 weight (this machine's layout)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def pack_int8_groups(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise int8 (q (out, in) int8, scales (out, in/group)) -> WeightOnlyInt8GroupLinear's tensors:
    the int4 kernel's packed weight of [h | l] (out, 2 in) and scales_and_zeros (2 in/group, out, 2)."""
    u = q.view(torch.uint8) ^ 128  # (out, in) uint8: q + 128 = 16 h + l (the sign bit flipped)
    packed = pack_int4(torch.cat((u >> 4, u & 15), dim=1))  # (out, 2 in) codes h | l -> packed
    s = scales.float()  # (out, in/group)
    hi = torch.stack((16 * s, torch.zeros_like(s)), dim=-1)  # (out, in/group, 2): w_h = 16 s (h - 8)
    lo = torch.stack((s, 8 * s), dim=-1)  # w_l = s (l - 8) + 8 s
    scales_and_zeros = torch.cat((hi, lo), dim=1).transpose(0, 1).to(dtype).contiguous()  # (2 in/group, out, 2)
    return packed, scales_and_zeros


class WeightOnlyInt8Linear(nn.Module):
    """y = x @ (weight * scales)^T + bias on aten._weight_int8pack_mm, the activation cast to the scales' dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=False)  # int8 (out, in)
        self.register_buffer("scales", scales, persistent=False)  # (out,) in the compute dtype
        self.register_buffer("bias", bias)  # (out,) or None; persistent, as nn.Linear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2 = aligned(x.reshape(-1, self.in_features).to(self.scales.dtype))  # (M, in)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales).to(x.dtype)  # (M, out)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.scales.dtype}"


class _Int4KernelLinear(nn.Module):
    """What the modules on aten._weight_int4pack_mm_for_cpu share: the packed weight, scales_and_zeros, bias."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, out_features: int,
                 group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", packed, persistent=False)  # uint8, the kernel's layout
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)  # (K/group, out, 2)
        self.register_buffer("bias", bias)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:  # (M, K) compute dtype -> (M, out)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, compute={self.scales_and_zeros.dtype}")


class WeightOnlyInt4Linear(_Int4KernelLinear):
    """y = x @ W^T + bias on aten._weight_int4pack_mm_for_cpu, W held in the kernel's packed layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()  # (M, in)
        y = self.matmul(x2).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class WeightOnlyInt8GroupLinear(_Int4KernelLinear):
    """Group-wise int8 as two nibbles on the int4 kernel (pack_int8_groups): y = [x | x] @ [W_h | W_l]^T + bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)  # (M, in)
        y = self.matmul(torch.cat((x2, x2), dim=1))  # (M, 2 in) -> (M, out)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
