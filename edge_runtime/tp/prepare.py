"""Cut a Hugging Face Llama-family folder into per-rank, per-layer safetensors shards (`edge-runtime tp prepare`).

    edge-runtime tp prepare --model HF_DIR --world-size 3 --weights 1,1,2 --out shards/
    # or: prepare("HF_DIR", 3, [1, 1, 2], "shards/")

Layout (a worker needs only its own rank folder):

    OUT/plan.json                                the folder is written as .OUT.partial-* and renamed when complete
    OUT/rank{r}/plan.json, config.json; tokenizer.json, generation_config.json, tokenizer_config.json,
                                                 special_tokens_map.json, chat_template.jinja (rank 0, those the model has)
    OUT/rank{r}/layer{i:03d}.attn.safetensors    input_layernorm.weight, self_attn.{q,k,v,o}_proj.weight (+ biases;
                                                 o_proj.bias on rank 0 only, so the allreduce adds it once;
                                                 + self_attn.{q,k}_norm.weight, whole, on every rank: Qwen3)
    OUT/rank{r}/layer{i:03d}.mlp.safetensors     post_attention_layernorm.weight, mlp.{gate,up,down}_proj.weight
                                                 (+ biases; down_proj.bias on rank 0 only)
    OUT/rank0/embed.safetensors                  embed_tokens.weight
    OUT/rank0/head.safetensors                   norm.weight, lm_head.weight (the embeddings when tied)

Rows of q/k/v and gate/up, columns of o and down, are read one tensor at a time through the model
folder's split.llama.checkpoint.tensor_source, so memory stays at about one shard block: safetensors
slices of the memory-mapped checkpoint, or, for a GGUF file's folder (edge_runtime.tp.gguf_source),
those rows / columns read straight from the .gguf and dequantized (split.llama.gguf_checkpoint).
Where a family fuses tensors (Phi-3's qkv_proj, gate_up_proj) a rank's rows of q, k, v (gate, up)
are sliced out of the fused tensor the same way (split.llama.hf_source), and the shards hold the
plain model's names, so workers never know the family. Tensors keep the checkpoint's dtype.

With `quantize` (split.llama.quantize's Int8 or Int4: `tp prepare --quantize int8|int4
--group-size G`) every projection is stored quantized (`<name>.weight` int8 / packed uint8,
`<name>.scales`, int4 also `<name>.zeros`) and the embeddings and LM head as int8 rows with one
scale each (llama.cpp likewise keeps its q4_0 output layer at higher precision). A weight is
quantized whole, a row chunk at a time, before it is sliced per rank, so a rank's slice holds
exactly the values one device would. The MLP is split in whole fixed chunks (row_units: each
rank's partial sums are those chunks' and its KV groups', exactly as one device sums them) and
every slice is checked against the kernels' shape rules before anything is written.
A projection the checkpoint already holds in the asked format (TensorSource.kept: a GGUF's Q4_0 /
Q8_0 integers for int4-g32 / int8-g32, split.llama.gguf_checkpoint.KEPT) is taken as stored instead
of quantized from its floats, and stderr says which were taken and which quantized.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from split.llama import Llama, LlamaConfig, Source, hf_source
from split.llama.checkpoint import TensorSource, tensor_source
from split.llama.quantize import Int4, Int8, handler_of, quantize_rows, row_units

from .blockfile import block_path, malloc_trim
from .budget import apply_budget
from .plan import ShardPlan, make_plan

BLOCK_KINDS = ("attn", "mlp")


def block_order(num_layers: int) -> list[tuple[int, str]]:
    """The blocks in the order one forward pass uses them."""
    return [(i, kind) for i in range(num_layers) for kind in BLOCK_KINDS]


def block_spec(config: LlamaConfig, plan: ShardPlan, rank: int, layer: int, kind: str):
    """[(key relative to layers.{layer}., slice kind, (a, b))] for one block of one rank.
    slice kind: "full", "rows" (dim 0) or "cols" (dim 1)."""
    spec = []
    if kind == "attn":
        q, kv = plan.q_rows(rank), plan.kv_rows(rank)
        spec.append(("input_layernorm.weight", "full", None))
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            spec.append((f"self_attn.{proj}.weight", "rows", rows))
            if config.attention_bias:
                spec.append((f"self_attn.{proj}.bias", "rows", rows))
        spec.append(("self_attn.o_proj.weight", "cols", q))
        if config.attention_out_bias and rank == 0:
            spec.append(("self_attn.o_proj.bias", "full", None))
        if config.qk_norm:  # over head_dim, the same for every head: each rank keeps all of it
            spec += [("self_attn.q_norm.weight", "full", None), ("self_attn.k_norm.weight", "full", None)]
    elif kind == "mlp":
        m = plan.mlp[rank]
        spec.append(("post_attention_layernorm.weight", "full", None))
        for proj in ("gate_proj", "up_proj"):
            spec.append((f"mlp.{proj}.weight", "rows", m))
            if config.mlp_bias:
                spec.append((f"mlp.{proj}.bias", "rows", m))
        spec.append(("mlp.down_proj.weight", "cols", m))
        if config.mlp_bias and rank == 0:
            spec.append(("mlp.down_proj.bias", "full", None))
    else:
        raise ValueError(f"block kind must be 'attn' or 'mlp', got {kind!r}")
    return spec


def _read(source: TensorSource, src: Source, shape: tuple[int, ...], how: str = "full", span=None) -> torch.Tensor:
    """Our tensor of `shape` (the model's, from config.json) from the checkpoint: whole, or the
    rows / columns [a, b) of it. A missing tensor or one of another shape is a ValueError naming it."""
    if src.name not in source.names():
        raise ValueError(f"checkpoint {source.where} is missing tensor {src.name!r}")
    want = (src.total, *shape[1:]) if src.total is not None else tuple(shape)  # a fused tensor: all its rows
    got = tuple(source.shape(src.name))
    if got != want:
        raise ValueError(f"checkpoint tensor {src.name!r} in {source.where} has shape {list(got)}, "
                         f"expected {list(want)} from config.json")
    t = source.read(src, rows=span if how == "rows" else None, cols=span if how == "cols" else None)
    return t.contiguous()


def make_format_plan(config: LlamaConfig, world_size: int, weights: list[float] | None,
                     quantize: Int8 | Int4 | None = None, max_rank_memory: int | None = None,
                     dtype: str = "fp32") -> ShardPlan:
    """The plan `prepare` writes: the split, the weight format and, with a budget, each rank's window.
    Every slice is checked against the format's shape rules. Where partials are rounded to bf16
    (`quantize`, or float weights computed in `dtype` "bf16") the MLP is split in whole row_units
    chunks, so every plan sums the same partials; fp32 weights are split in columns."""
    rounded = quantize is not None or dtype == "bf16"
    chunks = row_units(config, quantize)["mlp.down_proj"] if rounded else None
    plan = make_plan(config, world_size, weights, mlp_chunks=chunks)
    if quantize is not None:
        plan.extra["quantize"] = quantize.to_dict()
        Int8().check("lm_head.weight (and embed_tokens.weight: int8 rows)", config.vocab_size, config.hidden_size)
        with torch.device("meta"):
            layer0 = Llama(config, layers=range(0, 1), with_embed=False, with_head=False).layers["0"]
        for rank in range(world_size):
            for layer, kind in block_order(1):
                for key, how, span in block_spec(config, plan, rank, layer, kind):
                    if key.endswith("_proj.weight"):
                        lin = layer0.get_submodule(key[:-len(".weight")])
                        n_out, n_in = lin.out_features, lin.in_features
                        if how != "full":
                            n_out, n_in = (span[1] - span[0], n_in) if how == "rows" else (n_out, span[1] - span[0])
                        quantize.check(f"rank {rank}: layers.*.{key}", n_out, n_in)
    return apply_budget(plan, config, max_rank_memory)


def prepare(model_dir: str | Path, world_size: int, weights: list[float] | None, out: str | Path,
            progress: bool = True, max_rank_memory: int | None = None,
            quantize: Int8 | Int4 | None = None, ranks: Sequence[int] | None = None, dtype: str = "fp32") -> ShardPlan:
    """Write the shard folder for a `world_size`-way split; returns the plan. The folder is written
    under a temporary name beside `out` and renamed at the end, so a failure (a bad checkpoint, a
    full disk) leaves no partial folder; an earlier shard folder at `out` is replaced. With
    `max_rank_memory` (bytes) the plan records the window each rank can afford (budget.py); with
    `quantize` the weights are stored int8 / int4 (see the module docstring). `ranks`: only these
    rank folders (a peer preparing its own part of a plan; default all)."""
    model_dir, out = Path(model_dir), Path(out)
    config = LlamaConfig.from_dir(model_dir)
    plan = make_format_plan(config, world_size, weights, quantize, max_rank_memory, dtype)
    source = tensor_source(model_dir)
    if out.exists() and not _replaceable(out):
        raise ValueError(f"--out: {out} exists and is not a shard folder (no plan.json); give a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # as a folder made by mkdir would be (mkdtemp makes it private)
    try:
        _write(model_dir, config, plan, source, tmp, progress, quantize, range(world_size) if ranks is None else ranks)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return plan


def _replaceable(out: Path) -> bool:
    """An empty folder, or one `prepare` wrote (plan.json, or only rank folders of an older, interrupted run)."""
    entries = list(out.iterdir()) if out.is_dir() else None
    return entries is not None and ((out / "plan.json").is_file()
                                    or all(e.is_dir() and e.name.startswith("rank") for e in entries))


def _write(model_dir: Path, config: LlamaConfig, plan: ShardPlan, source: TensorSource, out: Path, progress: bool,
           quantize: Int8 | Int4 | None, ranks: Sequence[int]) -> None:
    from tqdm import tqdm

    L, ranks = config.num_hidden_layers, sorted(set(ranks))
    if not ranks or not all(0 <= r < plan.world_size for r in ranks):
        raise ValueError(f"ranks: expected some of 0..{plan.world_size - 1}, got {list(ranks)}")
    rank_dirs = {r: out / f"rank{r}" for r in ranks}
    for d in rank_dirs.values():
        d.mkdir()
        shutil.copyfile(model_dir / "config.json", d / "config.json")
    for name in ("tokenizer.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):  # the master's text, stop tokens and chat template
        if 0 in rank_dirs and (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, rank_dirs[0] / name)

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama(config).named_parameters(remove_duplicate=False)}

    def read(name: str, how: str = "full", span=None, src: Source | None = None) -> torch.Tensor:
        """Our tensor `name` (a fused one's rows for Phi-3: split.llama.hf_source)."""
        return _read(source, src or hf_source(config, name), shapes[name], how, span)

    kept, taken = source.kept(quantize), {}  # checkpoint names held in quantize's form; our name -> taken?

    def stored(name: str, fmt, src: Source | None = None) -> dict[str, torch.Tensor]:
        """Our weight `name` as stored: as read, as the checkpoint holds it already quantized in `fmt`,
        or quantized a row chunk at a time by `fmt`."""
        src = src or hf_source(config, name)
        if fmt is quantize and kept:
            taken[name] = src.name in kept
            if taken[name]:
                return _read_stored(source, src, fmt, shapes[name])
        if fmt is None:
            return {"weight": read(name, src=src)}
        out = quantize_rows(fmt, lambda a, b: read(name, "rows", (a, b), src), shapes[name][0])
        malloc_trim()  # the float32 chunks' heap goes back to the OS (+300 MiB of peak RSS without)
        return out

    def prefixed(prefix: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in t.items()}

    table = Int8() if quantize is not None else None  # embeddings and LM head: int8 rows
    what = f"{plan.world_size} ranks" if len(ranks) == plan.world_size else f"rank(s) {ranks} of {plan.world_size}"
    bar = tqdm(total=2 * L * len(ranks) + (2 if 0 in ranks else 0), desc=f"prepare {what}", unit="block",
               disable=not progress)
    if 0 in rank_dirs:
        save_file(prefixed("embed_tokens", stored("embed_tokens.weight", table)), rank_dirs[0] / "embed.safetensors")
        bar.update()
        head_src = hf_source(config, "lm_head.weight")
        if head_src.name not in source.names() and config.tie_word_embeddings:
            head_src = hf_source(config, "embed_tokens.weight")
        save_file({"norm.weight": read("norm.weight"), **prefixed("lm_head", stored("lm_head.weight", table, head_src))},
                  rank_dirs[0] / "head.safetensors")
        bar.update()
    for layer in range(L):
        for kind in BLOCK_KINDS:
            whole: dict[str, dict] = {}  # this block's quantized projections, whole, sliced per rank below
            for rank in ranks:
                tensors = {}
                for key, how, span in block_spec(config, plan, rank, layer, kind):
                    name = f"layers.{layer}.{key}"
                    if quantize is None or not key.endswith("_proj.weight"):
                        tensors[key] = read(name, how, span)
                        continue
                    if name not in whole:
                        whole[name] = stored(name, quantize)
                    part = whole[name] if how == "full" else quantize.narrow(whole[name], 1 if how == "cols" else 0, *span)
                    tensors.update(prefixed(key[:-len(".weight")], part))
                save_file(tensors, block_path(rank_dirs[rank], (layer, kind)))
                bar.update()
    bar.close()
    if kept:
        print(f"edge-runtime: prepare: {quantize.name} weights taken as stored from {source.where.name}"
              f" (a GGUF's own integers): {_summary(n for n, t in taken.items() if t)}; quantized from floats: "
              f"{_summary(n for n, t in taken.items() if not t)}; embeddings and LM head: int8 rows from floats",
              file=sys.stderr)
    for d in rank_dirs.values():
        plan.save(d / "plan.json")
    plan.save(out / "plan.json")


def _read_stored(source: TensorSource, src: Source, fmt: Int8 | Int4, shape: tuple[int, ...]) -> dict:
    """Our projection `src` as the checkpoint holds it in `fmt`'s stored form, checked against `shape`."""
    module = src.name[:-len(".weight")]
    t = source.read_stored(src, fmt)
    h = handler_of(module, t)
    if h.to_dict() != fmt.to_dict() or tuple(h.shapes(t)) != tuple(shape):
        raise ValueError(f"{source.where}: {module} is stored as {h.name} {list(h.shapes(t))}, "
                         f"expected {fmt.name} {list(shape)}")
    return t


def _summary(names) -> str:
    """'self_attn.q_proj x2, mlp.down_proj x2' for layers.0.self_attn.q_proj.weight, ... ('none' if empty)."""
    counts = Counter(n.split(".", 2)[2].removesuffix(".weight") for n in names)
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"


def is_prepared(out: str | Path, plan: ShardPlan, ranks: Sequence[int] | None = None) -> bool:
    """True if `out` holds a complete shard folder for exactly this plan (its `ranks`, default all)."""
    try:
        return all(ShardPlan.load(Path(out) / sub / "plan.json").to_dict() == plan.to_dict()
                   for sub in ["", *(f"rank{r}" for r in (range(plan.world_size) if ranks is None else ranks))])
    except (OSError, ValueError):
        return False
