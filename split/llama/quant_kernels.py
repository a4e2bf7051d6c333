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
slow path with fp32 activations) for the matmul and the result back to the input's dtype. A
row-parallel projection (o_proj, down_proj) may sum fixed units of its input columns on their own
and exactly (QuantLinear.set_units), so that how the units are spread over tensor-parallel ranks
does not change a bit of the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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


def checked_units(units, n: int) -> list[tuple[int, int]] | None:
    """`units` [(a, b), ...] as int pairs if they tile [0, n) in order, each non-empty, without gaps or
    overlaps (None stays None); ValueError otherwise."""
    if units is None:
        return None
    units = [(int(a), int(b)) for a, b in units]
    if not (units and units[0][0] == 0 and units[-1][1] == n and all(a < b for a, b in units)
            and all(b == c for (_, b), (c, _) in zip(units, units[1:]))):
        raise ValueError(f"units must tile [0, {n}) in order, got {units}")
    return units


class QuantLinear(nn.Module, ABC):
    """What the modules share: y = x @ W^T + bias on a kernel (`matmul`, in the compute dtype), and, for
    a row-parallel projection (o_proj, down_proj), partial sums per fixed unit of input columns.

    With units (set_units) the kernel runs once on M x U rows, row (m, u) being x[m] with every column
    outside unit u zeroed, so it is unit u's partial as the kernel rounds it (bf16): the kernels
    accumulate each output in float32 over the columns in order (int4: one FMA per column; int8: 16
    lanes of columns, reduced at the end), and adding exact zeros changes no sum, so a unit's row
    has the same bits whatever other units share the call, as long as a call's first column falls on
    the kernel's block (a whole group; int8 a multiple of 16: the shard boundaries of a plan). The
    rows are added in float64, exactly (bf16 values), so a device holding every unit and ranks each
    holding some of them, their float64 partials summed by the allreduce, get the same bits
    (edge_runtime.tp.parallelize.exact_partials): a re-plan changes no logit.
    """

    in_features: int
    out_features: int

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype  # the activation's dtype for the kernel (its scales' dtype)
        self.units: list[tuple[int, int]] | None = None  # [(a, b)] tiling [0, in_features)
        self.keep_float64 = False  # return the float64 sum (a rank's partial, cast after the allreduce)
        self._masks: torch.Tensor | None = None  # (U, in) 0 / 1 in the compute dtype

    def set_units(self, units, keep_float64: bool = False) -> None:
        """Sum the partial outputs of the input column ranges `units` [(a, b), ...] (tiling
        [0, in_features), in order) exactly; None: one kernel call as it rounds. keep_float64: return the
        float64 sum instead of casting it to the input's dtype (the caller sums ranks, then casts)."""
        self.units, self.keep_float64, self._masks = checked_units(units, self.in_features), keep_float64, None

    @abstractmethod
    def matmul(self, x2: torch.Tensor) -> torch.Tensor:  # (M, in) compute dtype -> (M, out)
        """The kernel on rows of activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, in)
        if self.units is None:
            y = self.matmul(x2).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        y = self.unit_sums(x2).reshape(*x.shape[:-1], self.out_features)  # float64
        if self.bias is not None:
            y = y + self.bias.double()
        return y if self.keep_float64 else y.to(x.dtype)

    def unit_sums(self, x2: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out) float64
        if self._masks is None or self._masks.dtype != x2.dtype:
            masks = torch.zeros(len(self.units), self.in_features, dtype=x2.dtype)  # (U, in)
            for u, (a, b) in enumerate(self.units):
                masks[u, a:b] = 1
            self._masks = masks
        M, U = x2.shape[0], len(self.units)
        rows = (x2[:, None, :] * self._masks).reshape(M * U, self.in_features)  # row (m, u): x2[m] on unit u
        return self.matmul(rows).view(M, U, self.out_features).double().sum(dim=1)  # exact: bf16 terms

    def extra_repr(self) -> str:
        units = "" if self.units is None else f", units={len(self.units)}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compute={self.compute_dtype}{units}")


class WeightOnlyInt8Linear(QuantLinear):
    """y = x @ (weight * scales)^T + bias on aten._weight_int8pack_mm, the activation cast to the scales' dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(scales.dtype)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=False)  # int8 (out, in)
        self.register_buffer("scales", scales, persistent=False)  # (out,) in the compute dtype
        self.register_buffer("bias", bias)  # (out,) or None; persistent, as nn.Linear's

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:  # (M, in) compute dtype -> (M, out)
        return torch.ops.aten._weight_int8pack_mm(aligned(x2), self.weight, self.scales)


class _Int4KernelLinear(QuantLinear):
    """What the modules on aten._weight_int4pack_mm_for_cpu share: the packed weight, scales_and_zeros, bias."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, out_features: int,
                 group_size: int, bias: torch.Tensor | None = None):
        super().__init__(scales_and_zeros.dtype)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", packed, persistent=False)  # uint8, the kernel's layout
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)  # (K/group, out, 2)
        self.register_buffer("bias", bias)

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:  # (M, K) compute dtype -> (M, out)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.group_size,
                                                          self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class WeightOnlyInt4Linear(_Int4KernelLinear):
    """y = x @ W^T + bias on aten._weight_int4pack_mm_for_cpu, W held in the kernel's packed layout."""

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        return self.kernel(x2)


class WeightOnlyInt8GroupLinear(_Int4KernelLinear):
    """Group-wise int8 as two nibbles on the int4 kernel (pack_int8_groups): y = [x | x] @ [W_h | W_l]^T + bias."""

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        return self.kernel(torch.cat((x2, x2), dim=1))  # (M, 2 in)
