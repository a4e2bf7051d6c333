"""Weight-only int8 / int8g / int4 quantization of a plain `Llama`, applied beside the model (model.py never knows).

    from split.llama.quantize import quantize_model, quantized_state_dict, load_quantized
    model = quantize_model(load_llama(folder), "int4", group_size=32)   # swaps the nn.Linear layers in place

    tensors = quantized_state_dict(load_llama(folder), "int8")           # offline: what to store
    safetensors.torch.save_file(tensors, "model-int8.safetensors")
    with torch.device("meta"):
        model = Llama(config)                                            # no weight memory
    load_quantized(model, safetensors.torch.load_file("model-int8.safetensors"))  # never builds an fp32 weight

Formats, by handler (handler(scheme, group_size); a plan stores to_dict(), handler_from_dict reads it back):
  scheme  name      handler      what it is
  int8    int8      Int8()       symmetric int8, one scale per output channel (a group_size is ignored)
  int8g   int8-g32  Int8Group(G) symmetric int8, one scale per group of G input columns (G = 32: GGUF q8_0)
  int4    int4-g32  Int4(G)      asymmetric int4, a scale and a float zero per group of G input columns
G is one of GROUP_SIZES (the int4 kernel's), 32 by default. "int8" is per-channel whatever group size is
passed with it (every caller passes one, --group-size's default included), so group-wise int8 is a
scheme of its own.

Stored format: per quantized linear `<name>` (HF-style names as in model.py, e.g. `layers.0.self_attn.q_proj`),
plain tensors that safetensors saves without pickle and that slice per rank:
  int8   <name>.weight  int8  (out, in)          w = weight * scales[:, None]; symmetric, -127..127
         <name>.scales  bf16  (out,)
  int8g  <name>.weight  int8  (out, in)          w[:, j] = weight[:, j] * scales[:, j//group]; symmetric,
         <name>.scales  bf16  (out, in/group)    -127..127 (the kernel also takes -128), no zeros
  int4   <name>.weight  uint8 (out, in/2)        two 4-bit values q in 0..15 per byte: column 2j in the
                                                 low nibble, 2j+1 in the high one
         <name>.scales  bf16  (out, in/group)    w[:, j] = (q[:, j] - 8) * scales[:, j//group] + zeros[:, j//group]
         <name>.zeros   bf16  (out, in/group)    (the "float zero point" of torch's int4 CPU kernel)
  <name>.bias, if any, stays as it was. Everything else in the state dict is unchanged.
A column-parallel shard (q/k/v/gate/up) is a row slice [a, b) of every tensor; a row-parallel one
(o_proj/down_proj) is a column slice [a, b) of the input, in whole groups for int8g / int4 (`unit`):
int8 weight[:, a:b] with all of scales; int8g weight[:, a:b], scales[:, a/group:b/group]; int4
weight[:, a/2:b/2], scales/zeros[:, a/group:b/group]. The scheme and group size are read back from
the tensors (handler_of: the weight's dtype, zeros or not, scales 1-D or 2-D; group = in /
scales.shape[1]), so a shard describes itself. Scales and zeros are rounded to bf16 before the
weights are rounded against them, so the stored values are exactly what the kernel multiplies by
(bf16 activations) and what `dequantize` returns.

Row-parallel projections (o_proj, down_proj) sum their partials per fixed unit (`row_units`: one per
KV group, num_key_value_heads chunks of the MLP): each unit's partial is rounded to bf16 by the
kernel on its own (one call on M x U rows, QuantLinear.set_units) and the units are added exactly in
float64, then cast once; quantize_model and load_quantized set them up, and a tensor-parallel rank
holds whole units (edge_runtime.tp.parallelize.exact_partials), so one device, any plan and a
re-plan give the same logits. The price is U rows through the kernel instead of one (the kernels
work in blocks of 4 rows, so up to 4 units cost one block): int4 down_proj 1024x2816 0.085 -> 0.150
ms a call with 4 units, o_proj 1024x1024 0.036 -> 0.066 ms; the 336M shape (4 KV heads) decodes
int4 in 30.7 -> 34.3 ms/token on one device (+12%) and 34.8 -> 37.4 at world 2 (+7%), int8 in
38.6 -> 43.7 (+13%) and 50.4 -> 52.7 (+5%) on this 2-core VM (`tp generate`, medians of
interleaved runs, 2026-12-07).

Kernels (split.llama.quant_kernels). The modules at 1.1B shapes, ms per call, fp32 in and out, bf16
for the kernel (scripts/bench_quant_kernels.py --rounds 30: interleaved rounds, median; a 2-core
AVX-512 VM shared with other work, 2 threads, warm weights):
                   2048x2048 M=1   M=16   5632x2048 M=1   M=16
  int8             0.20            0.92   0.42            2.28    aten._weight_int8pack_mm
  int8-g32         0.32            1.78   0.68            4.44    the int4 kernel on two nibbles: K = 2 in
  int4-g32         0.15            0.95   0.39            2.26    aten._weight_int4pack_mm_for_cpu
  (int8-g32 dequantized to bf16 and F.linear on every call: 1.5 ms and 3.8 ms at best, at M=1 as at M=16)
torch's packed CPU kernels take a slow path with fp32 activations and a fast one with bf16, so the
modules cast the activation to `compute_dtype` (bf16 by default) for the matmul and the result back
to the input's dtype. The int4 and int8g weights are repacked into the int4 kernel's
(machine-specific) layout once, when a module is built; no weight is ever dequantized on the hot
path. Group-wise int8 has no kernel of its own in torch: it runs on the int4 kernel with each code
split into two nibbles, twice the int4 work (1.6x to 2x the time of the per-channel int8 kernel),
its kernel tensors take 1.25 bytes a weight (kernel_bytes) where its stored form takes 1.0625 (g32),
and building them costs about twice int4's repacking (~30 ms per 11.5M weights here). The modules hold
only the kernel's tensors (non-persistent buffers): the stored form comes from `quantized_state_dict`,
not model.state_dict().
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig
from .model import Llama
from .quant_kernels import (QuantLinear, WeightOnlyInt4Linear, WeightOnlyInt8GroupLinear, WeightOnlyInt8Linear,
                            aligned, checked_units, pack_int4, pack_int8_groups)

SCHEMES = ("int8", "int8g", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
DEFAULT_GROUP_SIZE = 32
INT4_OUT_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out % 16 == 0
INT8_IN_MULTIPLE = 16  # _weight_int8pack_mm with bf16 input returns NaN (or crashes) unless in % 16 == 0
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # activation dtypes the kernels take


def _check_compute(dtype: torch.dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    return dtype


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """x (float32, > 0) rounded to the nearest bf16 that is >= x, so nothing clips against it."""
    y = x.to(torch.bfloat16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _group_size(scheme: str, group_size: int | None) -> int:
    g = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if g not in GROUP_SIZES:
        raise ValueError(f"{scheme} group_size must be one of {GROUP_SIZES} (the CPU kernel's), got {group_size}")
    return g


def _check_on_int4_kernel(name: str, scheme: str, group_size: int, n_out: int, n_in: int) -> None:
    """The shape rules of a format the int4 CPU kernel runs (int4, int8g)."""
    if n_in % group_size:
        raise ValueError(f"{name}: {scheme} group_size {group_size} does not divide in_features {n_in} "
                         f"(weight ({n_out}, {n_in})); pick one of {GROUP_SIZES} that does")
    if n_out % INT4_OUT_MULTIPLE:
        raise ValueError(f"{name}: {scheme} needs out_features divisible by {INT4_OUT_MULTIPLE} (the int4 CPU "
                         f"kernel's packing), got weight ({n_out}, {n_in})")


class Int8:
    """Symmetric int8, one scale per output channel."""

    name = "int8"
    unit = INT8_IN_MULTIPLE  # a row-parallel slice of the input must be whole multiples of this
    kernel_keys = ("weight", "scales")  # what kernel_tensors() returns, as the module's buffers

    def to_dict(self) -> dict:
        return {"scheme": "int8"}

    def stored_bytes(self, n_out: int, n_in: int) -> int:
        return n_out * n_in + 2 * n_out  # int8 weight, bf16 scales

    def kernel_bytes(self, n_out: int, n_in: int) -> int:
        return self.stored_bytes(n_out, n_in)  # the kernel takes them as stored (bf16 compute)

    def shell(self, n_out: int, n_in: int, bias: bool, compute_dtype=torch.bfloat16) -> "WeightOnlyInt8Linear":
        """The module with meta placeholders, for a pager to bind kernel_state() tensors into."""
        meta = dict(device="meta")
        return WeightOnlyInt8Linear(torch.empty(n_out, n_in, dtype=torch.int8, **meta),
                                    torch.empty(n_out, dtype=compute_dtype, **meta),
                                    torch.empty(n_out, **meta) if bias else None)

    def check(self, name: str, n_out: int, n_in: int) -> None:
        if n_in % INT8_IN_MULTIPLE:
            raise ValueError(f"{name}: int8 needs in_features divisible by {INT8_IN_MULTIPLE} (the bf16 int8 "
                             f"kernel), got weight ({n_out}, {n_in})")

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w.detach().float()  # (out, in)
        scales = _bf16_at_least(w.abs().amax(dim=1).clamp(min=1e-10) / 127)  # (out,)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        return {"weight": q, "scales": scales}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["weight"].float() * t["scales"].float()[:, None]  # (out, in) float32

    def shapes(self, t: dict[str, torch.Tensor]) -> tuple[int, int]:
        return tuple(t["weight"].shape)

    def kernel_tensors(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return aligned(t["weight"]), aligned(t["scales"].to(dtype))

    def narrow(self, t: dict[str, torch.Tensor], dim: int, a: int, b: int) -> dict[str, torch.Tensor]:
        """Output rows (dim 0) or input columns (dim 1) [a, b) of stored tensors; a column slice keeps
        every row's scale (computed over the whole row)."""
        if dim == 0:
            return {k: v[a:b].contiguous() for k, v in t.items()}
        return {"weight": t["weight"][:, a:b].contiguous(), "scales": t["scales"]}

    def module(self, t, bias=None, compute_dtype=torch.bfloat16) -> "WeightOnlyInt8Linear":
        return WeightOnlyInt8Linear(*self.kernel_tensors(t, _check_compute(compute_dtype)), bias=bias)


class Int4:
    """Asymmetric int4 in groups of `group_size` input columns, scale and float zero per group."""

    kernel_keys = ("weight", "scales_and_zeros")

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE):
        self.group_size = _group_size("int4", group_size)
        self.name = f"int4-g{self.group_size}"
        self.unit = self.group_size  # a row-parallel slice of the input must be whole groups

    def to_dict(self) -> dict:
        return {"scheme": "int4", "group_size": self.group_size}

    def stored_bytes(self, n_out: int, n_in: int) -> int:
        return n_out * n_in // 2 + 4 * n_out * (n_in // self.group_size)  # nibbles, bf16 scales and zeros

    def kernel_bytes(self, n_out: int, n_in: int) -> int:
        return self.stored_bytes(n_out, n_in)  # repacked nibbles, scales_and_zeros: the same sizes

    def shell(self, n_out: int, n_in: int, bias: bool, compute_dtype=torch.bfloat16) -> "WeightOnlyInt4Linear":
        """The module with meta placeholders, for a pager to bind kernel_state() tensors into."""
        meta = dict(device="meta")
        return WeightOnlyInt4Linear(torch.empty(n_out, n_in // 2, dtype=torch.uint8, **meta),
                                    torch.empty(n_in // self.group_size, n_out, 2, dtype=compute_dtype, **meta),
                                    n_in, n_out, self.group_size, torch.empty(n_out, **meta) if bias else None)

    def check(self, name: str, n_out: int, n_in: int) -> None:
        _check_on_int4_kernel(name, "int4", self.group_size, n_out, n_in)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        n_out, n_in = w.shape
        g = w.detach().float().reshape(n_out, n_in // self.group_size, self.group_size)  # (out, groups, G)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (out, groups)
        scales = _bf16_at_least((hi - lo).clamp(min=1e-10) / 15)
        zeros = (lo + 8 * scales.float()).to(torch.bfloat16)  # q = 8 lands on `zeros`
        q = torch.round((g - zeros.float()[..., None]) / scales.float()[..., None]) + 8
        q = q.clamp(0, 15).to(torch.uint8).reshape(n_out, n_in)  # (out, in), values 0..15
        packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (out, in/2)
        return {"weight": packed, "scales": scales, "zeros": zeros}

    @staticmethod
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        """(out, in/2) uint8 -> (out, in) uint8 values 0..15."""
        return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        q = self.unpack(t["weight"]).float()  # (out, in)
        n_out, n_in = q.shape
        q = q.reshape(n_out, n_in // self.group_size, self.group_size)
        w = (q - 8) * t["scales"].float()[..., None] + t["zeros"].float()[..., None]
        return w.reshape(n_out, n_in)  # float32

    def shapes(self, t: dict[str, torch.Tensor]) -> tuple[int, int]:
        return t["weight"].shape[0], 2 * t["weight"].shape[1]

    def kernel_tensors(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The kernel's packed weight (machine-specific layout) and scales_and_zeros (in/group, out, 2)."""
        packed = pack_int4(self.unpack(t["weight"]))  # (out, in) codes -> the kernel's layout
        scales_and_zeros = torch.stack((t["scales"], t["zeros"]), dim=-1).transpose(0, 1).to(dtype).contiguous()
        return packed, scales_and_zeros

    def narrow(self, t: dict[str, torch.Tensor], dim: int, a: int, b: int) -> dict[str, torch.Tensor]:
        """Output rows (dim 0) or input columns (dim 1) [a, b) of stored tensors; columns in whole groups."""
        if dim == 0:
            return {k: v[a:b].contiguous() for k, v in t.items()}
        g = self.group_size
        if a % g or b % g:
            raise ValueError(f"int4 column slice [{a}, {b}) is not in whole groups of {g}")
        return {"weight": t["weight"][:, a // 2:b // 2].contiguous(), "scales": t["scales"][:, a // g:b // g].contiguous(),
                "zeros": t["zeros"][:, a // g:b // g].contiguous()}

    def module(self, t, bias=None, compute_dtype=torch.bfloat16) -> "WeightOnlyInt4Linear":
        n_out, n_in = self.shapes(t)
        return WeightOnlyInt4Linear(*self.kernel_tensors(t, _check_compute(compute_dtype)), n_in, n_out,
                                    self.group_size, bias=bias)


class Int8Group:
    """Symmetric int8 in groups of `group_size` input columns, one bf16 scale per group and no zeros
    (at 32, GGUF q8_0's layout: gguf_checkpoint.q8_0_as_int8 keeps a file's codes in it). Runs on
    the int4 kernel, each code as two nibbles (quant_kernels.pack_int8_groups)."""

    kernel_keys = ("weight", "scales_and_zeros")

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE):
        self.group_size = _group_size("int8g", group_size)
        self.name = f"int8-g{self.group_size}"
        self.unit = self.group_size  # a row-parallel slice of the input must be whole groups

    def to_dict(self) -> dict:
        return {"scheme": "int8g", "group_size": self.group_size}

    def stored_bytes(self, n_out: int, n_in: int) -> int:
        return n_out * n_in + 2 * n_out * (n_in // self.group_size)  # int8 weight, bf16 scales

    def kernel_bytes(self, n_out: int, n_in: int) -> int:
        return n_out * n_in + 8 * n_out * (n_in // self.group_size)  # 2 nibbles a weight; 2 groups x (scale, zero)

    def shell(self, n_out: int, n_in: int, bias: bool, compute_dtype=torch.bfloat16) -> WeightOnlyInt8GroupLinear:
        """The module with meta placeholders, for a pager to bind kernel_state() tensors into."""
        meta = dict(device="meta")
        return WeightOnlyInt8GroupLinear(torch.empty(n_out, n_in, dtype=torch.uint8, **meta),
                                         torch.empty(2 * n_in // self.group_size, n_out, 2, dtype=compute_dtype, **meta),
                                         n_in, n_out, self.group_size, torch.empty(n_out, **meta) if bias else None)

    def check(self, name: str, n_out: int, n_in: int) -> None:
        _check_on_int4_kernel(name, "int8g", self.group_size, n_out, n_in)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        n_out, n_in = w.shape
        g = w.detach().float().reshape(n_out, n_in // self.group_size, self.group_size)  # (out, groups, G)
        scales = _bf16_at_least(g.abs().amax(dim=-1).clamp(min=1e-10) / 127)  # (out, groups)
        q = torch.round(g / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)  # (out, groups, G)
        return {"weight": q.reshape(n_out, n_in), "scales": scales}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        n_out, n_in = t["weight"].shape
        q = t["weight"].float().reshape(n_out, n_in // self.group_size, self.group_size)  # (out, groups, G)
        return (q * t["scales"].float()[..., None]).reshape(n_out, n_in)  # (out, in) float32

    def shapes(self, t: dict[str, torch.Tensor]) -> tuple[int, int]:
        return tuple(t["weight"].shape)

    def kernel_tensors(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The int4 kernel's packed weight of both nibbles (out, 2 in) and scales_and_zeros (2 in/group, out, 2)."""
        return pack_int8_groups(t["weight"], t["scales"], dtype)

    def narrow(self, t: dict[str, torch.Tensor], dim: int, a: int, b: int) -> dict[str, torch.Tensor]:
        """Output rows (dim 0) or input columns (dim 1) [a, b) of stored tensors; columns in whole groups."""
        if dim == 0:
            return {k: v[a:b].contiguous() for k, v in t.items()}
        g = self.group_size
        if a % g or b % g:
            raise ValueError(f"int8g column slice [{a}, {b}) is not in whole groups of {g}")
        return {"weight": t["weight"][:, a:b].contiguous(), "scales": t["scales"][:, a // g:b // g].contiguous()}

    def module(self, t, bias=None, compute_dtype=torch.bfloat16) -> WeightOnlyInt8GroupLinear:
        n_out, n_in = self.shapes(t)
        return WeightOnlyInt8GroupLinear(*self.kernel_tensors(t, _check_compute(compute_dtype)), n_in, n_out,
                                         self.group_size, bias=bias)


Format = Int8 | Int8Group | Int4


def quantize_rows(h: Format, read_rows, n_out: int, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """h.quantize of a weight read `chunk` output rows at a time (read_rows(a, b) -> rows [a, b)):
    the same tensors (every scheme is row-local), written into their final place chunk by chunk, so
    only one chunk is ever in float32."""
    out: dict[str, torch.Tensor] = {}
    for a in range(0, n_out, chunk):
        b = min(a + chunk, n_out)
        for k, v in h.quantize(read_rows(a, b)).items():
            if k not in out:
                out[k] = torch.empty(n_out, *v.shape[1:], dtype=v.dtype)
            out[k][a:b] = v
    return out


def row_units(config: LlamaConfig, h: Format | None) -> dict[str, list[tuple[int, int]]]:
    """The fixed units whose partial sums a row-parallel projection in format `h` (None: float weights
    held in bf16, CastLinear) rounds on their own (set_units), as input column ranges by module name
    in a layer: o_proj one per KV head's group of query heads, down_proj num_key_value_heads chunks
    of the intermediate dimension in whole h.unit columns (the first ones a unit larger where they
    do not divide evenly, the last also taking any remainder; fewer chunks when there are fewer
    units). A tensor-parallel plan gives each rank whole units of both (edge_runtime.tp.plan), so
    every plan, and one device, sums the same bf16 partials."""
    kv, I, unit = config.num_key_value_heads, config.intermediate_size, 1 if h is None else h.unit
    width = config.num_attention_heads // kv * config.head_dim  # o_proj columns of one KV group
    n = I // unit  # whole units of the intermediate dimension
    chunks = min(kv, n)
    if chunks == 0:
        raise ValueError(f"{h.name} needs intermediate_size of at least {unit}, got {I}")
    sizes = [(n // chunks + (i < n % chunks)) * unit for i in range(chunks)]
    sizes[-1] += I % unit
    bounds = [sum(sizes[:i]) for i in range(chunks + 1)]
    return {"self_attn.o_proj": [(i * width, (i + 1) * width) for i in range(kv)],
            "mlp.down_proj": list(zip(bounds, bounds[1:]))}


def _with_row_units(config: LlamaConfig, name: str, module: QuantLinear, h: Format) -> QuantLinear:
    """`module` (linear `name`, e.g. "layers.3.mlp.down_proj"), with row_units' units if it is row-parallel."""
    units = row_units(config, h).get(name.split(".", 2)[-1])
    if units is not None:
        module.set_units(units)
    return module


def use_row_units(model: Llama, h: Format) -> Llama:
    """What quantize_model and load_quantized do, for a model whose quantized modules (format `h`) were
    built by hand: row_units' fixed units on every held layer's o_proj and down_proj. Returns `model`."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            _with_row_units(model.config, name, module, h)
    return model


def handler(scheme: str, group_size: int | None = None) -> Format:
    """The handler that quantizes, dequantizes and builds modules for a format (see the module docstring):
    "int8" -> Int8() (per-channel; any group_size is ignored, as it always was), "int8g" -> Int8Group(G),
    "int4" -> Int4(G), G = group_size or 32."""
    if scheme == "int8":
        return Int8()
    if scheme == "int8g":
        return Int8Group(_group_size(scheme, group_size))
    if scheme == "int4":
        return Int4(_group_size(scheme, group_size))
    raise ValueError(f"scheme must be one of {', '.join(map(repr, SCHEMES))}, got {scheme!r}")


def handler_from_dict(d: dict | None) -> Format | None:
    """What to_dict() wrote (a plan's "quantize" entry) back to its handler; None stays None."""
    if d is None:
        return None
    if not isinstance(d, dict) or d.get("scheme") not in SCHEMES:
        raise ValueError(f"quantize must be {{'scheme': 'int8'}} or {{'scheme': 'int8g' | 'int4', 'group_size': G}}, "
                         f"got {d!r}")
    return handler(d["scheme"], None if d.get("group_size") is None else int(d["group_size"]))


def handler_of(name: str, t: dict[str, torch.Tensor]) -> Format:
    """The handler for stored tensors `t` ("weight", "scales"[, "zeros"]) of linear `name`, from their dtypes
    and shapes: int8 weight with scales (out,): int8; with scales (out, in/group): int8g; uint8 with zeros: int4."""
    w, s = t["weight"], t["scales"]
    if w.dtype == torch.int8 and "zeros" not in t:
        if w.ndim == 2 and s.shape == (w.shape[0],):
            return Int8()
        if w.ndim == 2 and s.ndim == 2 and s.shape[0] == w.shape[0] and s.shape[1] and w.shape[1] % s.shape[1] == 0 \
                and w.shape[1] // s.shape[1] in GROUP_SIZES:
            return Int8Group(w.shape[1] // s.shape[1])
        raise ValueError(f"{name}: int8 expects weight (out, in) with scales (out,), or (out, in/group) for a "
                         f"group in {GROUP_SIZES}, got {tuple(w.shape)} and {tuple(s.shape)}")
    if w.dtype == torch.uint8 and "zeros" in t:
        n_out, n_in = (w.shape[0], 2 * w.shape[1]) if w.ndim == 2 else (0, 0)
        if w.ndim != 2 or s.ndim != 2 or s.shape[0] != n_out or s.shape[1] == 0 or n_in % s.shape[1] \
                or t["zeros"].shape != s.shape:
            raise ValueError(f"{name}: int4 expects weight (out, in/2) with scales and zeros (out, in/group), "
                             f"got {tuple(w.shape)}, {tuple(s.shape)} and {tuple(t['zeros'].shape)}")
        return Int4(n_in // s.shape[1])
    raise ValueError(f"{name}: not a quantized linear: weight {w.dtype} {tuple(w.shape)}, "
                     f"{'with' if 'zeros' in t else 'without'} zeros (int8 weight without zeros, or uint8 with)")


def linears(model: Llama, head: bool = False) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers to quantize, by module name: every projection of every layer held, plus
    the LM head when `head` (the embeddings are never quantized)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (head or n != "lm_head")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _checked(model: Llama, scheme: str, group_size: int, head: bool) -> tuple[Format, list]:
    h = handler(scheme, group_size)
    targets = linears(model, head)
    for name, lin in targets:  # every error before any work
        h.check(f"{name}.weight", lin.out_features, lin.in_features)
    return h, targets


@torch.no_grad()
def quantized_state_dict(model: Llama, scheme: str, group_size: int = 32,
                         head: bool = False) -> dict[str, torch.Tensor]:
    """The state dict to store: `model`'s, with each quantized linear's weight replaced by its stored
    tensors (see the module docstring). A tied, unquantized LM head is left out (load_quantized re-ties it)."""
    h, targets = _checked(model, scheme, group_size, head)
    names = {n for n, _ in targets}
    tied = model.config.tie_word_embeddings and model.embed_tokens is not None and model.lm_head is not None
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in names and leaf == "weight":
            out.update({f"{mod}.{k}": v for k, v in h.quantize(t).items()})
        elif not (key == "lm_head.weight" and tied):
            out[key] = t.contiguous()
    return out


@torch.no_grad()
def quantize_model(model: Llama, scheme: str, group_size: int = 32, head: bool = False,
                   compute_dtype: torch.dtype = torch.bfloat16) -> Llama:
    """Replace the nn.Linear layers of a loaded `model` (and its LM head when `head`) with weight-only
    int8 / int8g / int4 modules, in place; their float weights are dropped. Returns `model`."""
    h, targets = _checked(model, scheme, group_size, head)
    for name, lin in targets:
        bias = None if lin.bias is None else lin.bias.detach()
        _set_module(model, name, h.module(h.quantize(lin.weight), bias, compute_dtype))
    return use_row_units(model, h)


@torch.no_grad()
def load_quantized(model: Llama, state: dict[str, torch.Tensor], compute_dtype: torch.dtype = torch.bfloat16,
                   strict: bool = True) -> Llama:
    """Load a `quantized_state_dict` (or a shard of one) into `model`, which may live on the meta device:
    each nn.Linear whose `<name>.scales` is in `state` becomes a quantized module built straight from
    the stored tensors; the rest loads with load_state_dict(assign=True). Returns `model`."""
    state = dict(state)
    for name, lin in linears(model, head=True):
        if f"{name}.scales" not in state:
            continue
        t = {k: state.pop(f"{name}.{k}") for k in ("weight", "scales", "zeros") if f"{name}.{k}" in state}
        if "weight" not in t:
            raise ValueError(f"{name}: {name}.scales is stored but {name}.weight is missing")
        h = handler_of(name, t)
        n_out, n_in = h.shapes(t)
        if (n_out, n_in) != (lin.out_features, lin.in_features):
            raise ValueError(f"{name}: stored {h.name} weight is ({n_out}, {n_in}), the model expects "
                             f"({lin.out_features}, {lin.in_features})")
        h.check(f"{name}.weight", n_out, n_in)
        bias = state.get(f"{name}.bias")  # also loaded below, into the module's bias buffer
        if (bias is None) != (lin.bias is None):
            raise ValueError(f"{name}: bias {'missing from' if bias is None else 'unexpected in'} the stored tensors")
        _set_module(model, name, _with_row_units(model.config, name, h.module(t, bias, compute_dtype), h))
    tied = model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear)
    if tied and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=strict, assign=True)
    if tied:
        model.tie_weights()
    return model



# --------------------------------------------------------------------------- paged weights

def kernel_state(tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype = torch.bfloat16) -> dict:
    """A block's stored tensors -> what the quantized modules bind (the handler's kernel_keys): for int8
    `<name>.weight` (64-byte aligned) and `<name>.scales` (compute dtype), for int4 and int8g
    `<name>.weight` in the int4 kernel's packed layout and `<name>.scales_and_zeros`. Tensors already
    in that form, and all others, pass unchanged."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".scales")]:
        name = key[:-len(".scales")]
        t = {k: out.pop(f"{name}.{k}") for k in ("weight", "scales", "zeros") if f"{name}.{k}" in out}
        if "weight" not in t:
            raise ValueError(f"{name}: {name}.scales is stored but {name}.weight is missing")
        h = handler_of(name, t)
        h.check(f"{name}.weight", *h.shapes(t))
        out.update({f"{name}.{k}": v for k, v in zip(h.kernel_keys, h.kernel_tensors(t, compute_dtype))})
    return out


class CastLinear(nn.Linear):
    """nn.Linear whose weight is held in a narrower float dtype (bf16): the activation is cast to it for
    the matmul and the result back, so norms, the residual stream and the allreduce stay float32.

    A row-parallel projection may sum fixed units of its input columns on their own (set_units, as
    QuantLinear does): each unit's partial is one matmul over its own columns, rounded to bf16, and
    the partials are added in float64, exactly. Every plan (and one device) runs the same matmuls
    on the same columns, which gives the same bits whatever the weight's row stride or the thread
    count (checked on this machine's kernels for M = 1..64); one matmul over a rank's columns, or
    masked rows as QuantLinear runs, does not once M reaches 16. The price: down_proj of the 1.1B
    shape in 4 units, 2.4 -> 3.8 ms a decode call on one thread."""

    units: list[tuple[int, int]] | None = None
    keep_float64 = False

    def set_units(self, units, keep_float64: bool = False) -> None:
        """See QuantLinear.set_units."""
        self.units, self.keep_float64 = checked_units(units, self.in_features), keep_float64

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        w, b = self.weight, self.bias
        if self.units is None:
            return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype)).to(x.dtype)
        x2 = x.reshape(-1, self.in_features).to(w.dtype)  # (M, in)
        y = torch.stack([F.linear(x2[:, a:c], w[:, a:c]) for a, c in self.units]).double().sum(dim=0)  # (M, out)
        y = y.reshape(*x.shape[:-1], self.out_features)
        if b is not None:
            y = y + b.double()
        return y if self.keep_float64 else y.to(x.dtype)


def weight_shells(model: Llama, h: Format | None, float_dtype: torch.dtype = torch.float32) -> Llama:
    """Swap the layers' nn.Linear modules (as sliced, on meta) for modules of the stored format, with
    meta placeholders a pager binds into: quantized ones for `h`, CastLinear for float weights held
    in bf16/fp16, nothing for float32. The LM head is not touched. Returns `model`."""
    for name, lin in linears(model):
        if h is not None:
            h.check(f"{name}.weight", lin.out_features, lin.in_features)
            _set_module(model, name, h.shell(lin.out_features, lin.in_features, lin.bias is not None))
        elif float_dtype != torch.float32:
            _set_module(model, name, CastLinear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                                device="meta", dtype=float_dtype))
    return model
