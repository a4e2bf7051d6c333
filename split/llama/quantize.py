"""Weight-only int8 / int4 quantization of a plain `Llama`, applied beside the model (model.py never knows).

    from split.llama.quantize import quantize_model, quantized_state_dict, load_quantized
    model = quantize_model(load_llama(folder), "int4", group_size=32)   # swaps the nn.Linear layers in place

    tensors = quantized_state_dict(load_llama(folder), "int8")           # offline: what to store
    safetensors.torch.save_file(tensors, "model-int8.safetensors")
    with torch.device("meta"):
        model = Llama(config)                                            # no weight memory
    load_quantized(model, safetensors.torch.load_file("model-int8.safetensors"))  # never builds an fp32 weight

Stored format: per quantized linear `<name>` (HF-style names as in model.py, e.g. `layers.0.self_attn.q_proj`),
plain tensors that safetensors saves without pickle and that slice per rank:
  int8  <name>.weight  int8  (out, in)          w = weight * scales[:, None]; symmetric, -127..127
        <name>.scales  bf16  (out,)
  int4  <name>.weight  uint8 (out, in/2)        two 4-bit values q in 0..15 per byte: column 2j in the
                                                low nibble, 2j+1 in the high one
        <name>.scales  bf16  (out, in/group)    w[:, j] = (q[:, j] - 8) * scales[:, j//group] + zeros[:, j//group]
        <name>.zeros   bf16  (out, in/group)    (the "float zero point" of torch's int4 CPU kernel)
  <name>.bias, if any, stays as it was. Everything else in the state dict is unchanged.
A column-parallel shard (q/k/v/gate/up) is a row slice [a, b) of every tensor; a row-parallel one
(o_proj/down_proj) is a column slice [a, b) of the input in whole groups: int4 weight[:, a/2:b/2] and
scales/zeros[:, a/group:b/group]; int8 weight[:, a:b] with all of scales. The scheme and group size
are read back from the tensors (dtype of weight; group = in / scales.shape[1]), so a shard describes itself.
Scales and zeros are rounded to bf16 before the weights are rounded against them, so the stored
values are exactly what the kernel multiplies by (bf16 activations) and what `dequantize` returns.

Kernels (scripts/bench_quant_kernels.py, this CPU, 2 threads): torch's packed CPU kernels
`aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` take a slow path with fp32
activations and a fast one with bf16 activations, so the modules cast the activation to
`compute_dtype` (bf16 by default) for the matmul and the result back to the input's dtype. The
int4 weight is repacked into the kernel's (machine-specific) layout once, when a module is built;
no weight is ever dequantized on the hot path. The modules hold only the kernel's tensors
(non-persistent buffers): the stored form comes from `quantized_state_dict`, not model.state_dict().
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import Llama

GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
INT4_OUT_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out % 16 == 0
INT8_IN_MULTIPLE = 16  # _weight_int8pack_mm with bf16 input returns NaN (or crashes) unless in % 16 == 0
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # activation dtypes the kernels take


def _check_compute(dtype: torch.dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    return dtype


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, contiguous and 64-byte aligned (copied if not). The bf16 path of _weight_int8pack_mm crashes
    (SIGSEGV) on a weight or activation at an unaligned address once M >= 4: a slice, or a tensor
    read from a safetensors file, may be one."""
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """x (float32, > 0) rounded to the nearest bf16 that is >= x, so nothing clips against it."""
    y = x.to(torch.bfloat16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


class Int8:
    """Symmetric int8, one scale per output channel."""

    name = "int8"
    unit = INT8_IN_MULTIPLE  # a row-parallel slice of the input must be whole multiples of this

    def to_dict(self) -> dict:
        return {"scheme": "int8"}

    def stored_bytes(self, n_out: int, n_in: int) -> int:
        return n_out * n_in + 2 * n_out  # int8 weight, bf16 scales

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
        return _aligned(t["weight"]), _aligned(t["scales"].to(dtype))

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

    def __init__(self, group_size: int = 32):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {GROUP_SIZES} (the CPU kernel's), got {group_size}")
        self.group_size = group_size
        self.name = f"int4-g{group_size}"
        self.unit = group_size  # a row-parallel slice of the input must be whole groups

    def to_dict(self) -> dict:
        return {"scheme": "int4", "group_size": self.group_size}

    def stored_bytes(self, n_out: int, n_in: int) -> int:
        return n_out * n_in // 2 + 4 * n_out * (n_in // self.group_size)  # nibbles, bf16 scales and zeros

    def shell(self, n_out: int, n_in: int, bias: bool, compute_dtype=torch.bfloat16) -> "WeightOnlyInt4Linear":
        """The module with meta placeholders, for a pager to bind kernel_state() tensors into."""
        meta = dict(device="meta")
        return WeightOnlyInt4Linear(torch.empty(n_out, n_in // 2, dtype=torch.uint8, **meta),
                                    torch.empty(n_in // self.group_size, n_out, 2, dtype=compute_dtype, **meta),
                                    n_in, n_out, self.group_size, torch.empty(n_out, **meta) if bias else None)

    def check(self, name: str, n_out: int, n_in: int) -> None:
        if n_in % self.group_size:
            raise ValueError(f"{name}: int4 group_size {self.group_size} does not divide in_features {n_in} "
                             f"(weight ({n_out}, {n_in})); pick one of {GROUP_SIZES} that does")
        if n_out % INT4_OUT_MULTIPLE:
            raise ValueError(f"{name}: int4 needs out_features divisible by {INT4_OUT_MULTIPLE} (the CPU "
                             f"kernel's packing), got weight ({n_out}, {n_in})")

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
        q = self.unpack(t["weight"]).to(torch.int32)  # (out, in)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
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


def quantize_rows(h: "Int8 | Int4", read_rows, n_out: int, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """h.quantize of a weight read `chunk` output rows at a time (read_rows(a, b) -> rows [a, b)):
    the same tensors (both schemes are row-local), written into their final place chunk by chunk, so
    only one chunk is ever in float32."""
    out: dict[str, torch.Tensor] = {}
    for a in range(0, n_out, chunk):
        b = min(a + chunk, n_out)
        for k, v in h.quantize(read_rows(a, b)).items():
            if k not in out:
                out[k] = torch.empty(n_out, *v.shape[1:], dtype=v.dtype)
            out[k][a:b] = v
    return out


def handler(scheme: str, group_size: int = 32) -> Int8 | Int4:
    """"int8" or "int4" (with its group size) -> the handler that quantizes, dequantizes and builds modules."""
    if scheme == "int8":
        return Int8()
    if scheme == "int4":
        return Int4(group_size)
    raise ValueError(f"scheme must be 'int8' or 'int4', got {scheme!r}")


def handler_from_dict(d: dict | None) -> Int8 | Int4 | None:
    """What to_dict() wrote (a plan's "quantize" entry) back to its handler; None stays None."""
    if d is None:
        return None
    if not isinstance(d, dict) or d.get("scheme") not in ("int8", "int4"):
        raise ValueError(f"quantize must be {{'scheme': 'int8'}} or {{'scheme': 'int4', 'group_size': G}}, got {d!r}")
    return handler(d["scheme"], int(d.get("group_size", 32)))


def handler_of(name: str, t: dict[str, torch.Tensor]) -> Int8 | Int4:
    """The handler for stored tensors `t` ("weight", "scales"[, "zeros"]) of linear `name`, from their dtypes."""
    w, s = t["weight"], t["scales"]
    if w.dtype == torch.int8 and "zeros" not in t:
        if w.ndim != 2 or s.shape != (w.shape[0],):
            raise ValueError(f"{name}: int8 expects weight (out, in) and scales (out,), got "
                             f"{tuple(w.shape)} and {tuple(s.shape)}")
        return Int8()
    if w.dtype == torch.uint8 and "zeros" in t:
        n_out, n_in = (w.shape[0], 2 * w.shape[1]) if w.ndim == 2 else (0, 0)
        if w.ndim != 2 or s.ndim != 2 or s.shape[0] != n_out or s.shape[1] == 0 or n_in % s.shape[1] \
                or t["zeros"].shape != s.shape:
            raise ValueError(f"{name}: int4 expects weight (out, in/2) with scales and zeros (out, in/group), "
                             f"got {tuple(w.shape)}, {tuple(s.shape)} and {tuple(t['zeros'].shape)}")
        return Int4(n_in // s.shape[1])
    raise ValueError(f"{name}: not a quantized linear: weight {w.dtype} {tuple(w.shape)}, "
                     f"{'with' if 'zeros' in t else 'without'} zeros (int8 weight without zeros, or uint8 with)")


class WeightOnlyInt8Linear(nn.Module):
    """y = x @ (weight * scales)^T + bias on aten._weight_int8pack_mm, the activation cast to the scales' dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=False)  # int8 (out, in)
        self.register_buffer("scales", scales, persistent=False)  # (out,) in the compute dtype
        self.register_buffer("bias", bias)  # (out,) or None; persistent, as nn.Linear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2 = _aligned(x.reshape(-1, self.in_features).to(self.scales.dtype))  # (M, in)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales).to(x.dtype)  # (M, out)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.scales.dtype}"


class WeightOnlyInt4Linear(nn.Module):
    """y = x @ W^T + bias on aten._weight_int4pack_mm_for_cpu, W held in the kernel's packed layout."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, out_features: int,
                 group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", packed, persistent=False)  # uint8, the kernel's layout
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)  # (in/group, out, 2)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()  # (M, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, compute={self.scales_and_zeros.dtype}")


def linears(model: Llama, head: bool = False) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers to quantize, by module name: every projection of every layer held, plus
    the LM head when `head` (the embeddings are never quantized)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (head or n != "lm_head")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _checked(model: Llama, scheme: str, group_size: int, head: bool) -> tuple[Int8 | Int4, list]:
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
    int8 / int4 modules, in place; their float weights are dropped. Returns `model`."""
    h, targets = _checked(model, scheme, group_size, head)
    for name, lin in targets:
        bias = None if lin.bias is None else lin.bias.detach()
        _set_module(model, name, h.module(h.quantize(lin.weight), bias, compute_dtype))
    return model


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
        _set_module(model, name, h.module(t, bias, compute_dtype))
    tied = model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear)
    if tied and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=strict, assign=True)
    if tied:
        model.tie_weights()
    return model



# --------------------------------------------------------------------------- paged weights

def kernel_state(tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype = torch.bfloat16) -> dict:
    """A block's stored tensors -> what the quantized modules bind: for int8 `<name>.weight` (64-byte
    aligned) and `<name>.scales` (compute dtype), for int4 `<name>.weight` in the kernel's packed layout
    and `<name>.scales_and_zeros`. Tensors already in that form, and all others, pass unchanged."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".scales")]:
        name = key[:-len(".scales")]
        t = {k: out.pop(f"{name}.{k}") for k in ("weight", "scales", "zeros") if f"{name}.{k}" in out}
        if "weight" not in t:
            raise ValueError(f"{name}: {name}.scales is stored but {name}.weight is missing")
        h = handler_of(name, t)
        h.check(f"{name}.weight", *h.shapes(t))
        weight, scales = h.kernel_tensors(t, compute_dtype)
        out[f"{name}.weight"] = weight
        out[f"{name}.{'scales' if isinstance(h, Int8) else 'scales_and_zeros'}"] = scales
    return out


class CastLinear(nn.Linear):
    """nn.Linear whose weight is held in a narrower float dtype (bf16): the activation is cast to it for
    the matmul and the result back, so norms, the residual stream and the allreduce stay float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        w, b = self.weight, self.bias
        return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype)).to(x.dtype)


def weight_shells(model: Llama, h: Int8 | Int4 | None, float_dtype: torch.dtype = torch.float32) -> Llama:
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
