"""Load a Hugging Face Llama/Mistral/Qwen2/Qwen3/Phi-3 folder into split.llama.Llama, only the parts it holds.

    model = load_llama("path/to/hf_folder")                                   # the whole model
    device_part = load_llama(path, layers=range(0, 4), with_head=False)        # embed + layers 0..3
    cloud_part = load_llama(path, layers=range(4, 32), with_embed=False)       # layers 4..31 + head
    source = tensor_source(path)                                              # its tensors, one read at a time
    source.read(hf_source(config, "layers.0.mlp.up_proj.weight"), rows=(0, 128))

The folder holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json (SafetensorsFolder), or, for a llama.cpp GGUF file, the small folder
edge_runtime.tp.gguf_source makes for it, whose gguf_checkpoint.FOLDER_INDEX says where in the .gguf
each tensor lies (gguf_checkpoint.GGUFTensors, dequantized as it is read). Tensors are read with
safetensors' safe_open (memory-mapped, no pickle), the file opened per tensor so nothing stays
mapped; files that hold none of the wanted tensors are never opened. The model is built on the
meta device first, so no memory is spent on weights that are then overwritten. Where a family
fuses tensors (Phi-3's qkv_proj, gate_up_proj) each of our parameters is read as its rows of the
fused tensor (families.hf_source), never the whole model at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Protocol

import torch
from safetensors import safe_open

from .config import LlamaConfig
from .families import Source, hf_name, hf_source
from .model import Llama

ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Present in some older checkpoints, recomputed by the model: skipped, not "unexpected".
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


__all__ = ["SafetensorsFolder", "TensorSource", "checkpoint_index", "hf_name", "hf_source", "load_llama", "read_tensor",
           "tensor_source"]


class TensorSource(Protocol):
    """A checkpoint's tensors by Hugging Face name, each read on its own (whole, or rows / columns)."""

    where: Path  # the folder or file, named in errors

    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, src: Source, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Our parameter (its rows of a fused tensor): all of it, or its rows / columns [a, b)."""

    def kept(self, fmt) -> set[str]:
        """The projections (weight names) the checkpoint holds already in the stored form of `fmt` (a
        split.llama.quantize handler, or None), integers and scales, to be taken instead of quantized."""

    def read_stored(self, src: Source, fmt) -> dict[str, torch.Tensor]:
        """One of kept(fmt)'s projections (rows src.rows of a fused one) in that stored form."""


def tensor_source(path: str | Path) -> TensorSource:
    """The tensors of model folder `path`: from the GGUF file its gguf_checkpoint.FOLDER_INDEX names,
    else from its safetensors files."""
    from .gguf_checkpoint import FOLDER_INDEX, GGUFTensors

    path = _folder(path)
    return GGUFTensors.from_folder(path) if (path / FOLDER_INDEX).is_file() else SafetensorsFolder(path)


def _folder(path: str | Path) -> Path:
    """`path`, refused with what to do instead if it is a .gguf file rather than a model folder."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ValueError(f"{path}: a GGUF file, not a model folder; give the folder that edge_runtime.tp.gguf_source."
                         f"model_folder(path) makes for it (what --model FILE.gguf uses)")
    return path


class SafetensorsFolder:
    """A Hugging Face folder's safetensors files: a TensorSource (floats only: kept() is empty)."""

    def __init__(self, path: str | Path):
        self.where = Path(path)
        self.files = checkpoint_index(self.where)  # tensor name -> file

    def names(self) -> Iterable[str]:
        return self.files.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._file(name), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, src: Source, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        with safe_open(self._file(src.name), framework="pt") as f:  # opened per tensor: nothing stays mapped
            return read_tensor(f, src, rows, cols)

    def kept(self, fmt) -> set[str]:
        return set()

    def read_stored(self, src: Source, fmt) -> dict[str, torch.Tensor]:
        raise ValueError(f"{self.where}: a Hugging Face folder holds floats only, no {fmt.name} tensor {src.name!r}")

    def _file(self, name: str) -> Path:
        file = self.files[name]
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard {file} (listed in the index) does not exist")
        return file


def read_tensor(f, src: Source, rows: tuple[int, int] | None = None,
                cols: tuple[int, int] | None = None) -> torch.Tensor:
    """Our parameter from an open safetensors file `f` (safe_open): all of it, or only its rows
    [a, b) / columns [a, b), read as a slice of the checkpoint tensor (of its rows in a fused one)."""
    if rows is None and cols is None and src.rows is None:
        return f.get_tensor(src.name)  # on safe_open's device
    sl = f.get_slice(src.name)
    r = src.span(*rows) if rows else src.rows
    r = slice(*r) if r else slice(None)
    return sl[r, cols[0]:cols[1]] if cols else sl[r]


def checkpoint_index(path: str | Path) -> dict[str, Path]:
    """Map every tensor name in the folder's safetensors file(s) to the file holding it."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_llama(path: str | Path, layers=None, with_embed: bool = True, with_head: bool = True,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    """Build a Llama holding `layers` (a contiguous range; None = all) and load its weights from `path`."""
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype must be one of {ALLOWED_DTYPES}, got {dtype!r}")
    path = _folder(path)
    config = LlamaConfig.from_dir(path)
    with torch.device("meta"):
        model = Llama(config, layers=layers, with_embed=with_embed, with_head=with_head)
        all_shapes = Llama(config).state_dict()  # the whole model, never allocated
    all_names = {hf_source(config, n).name for n in all_shapes}

    source = tensor_source(path)
    names = set(source.names())
    unexpected = sorted(n for n in names if n not in all_names and not _IGNORED.search(n))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) for a {config.model_type} model: {unexpected[:5]}"
                         + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))

    # Which checkpoint tensor feeds each of our parameters (a tied head may read the embeddings).
    wanted = model.state_dict()  # name -> meta tensor with the expected shape
    sources: dict[str, Source] = {}
    for name in wanted:
        src = hf_source(config, name)
        if src.name not in names and name == "lm_head.weight" and config.tie_word_embeddings:
            src = hf_source(config, "embed_tokens.weight")
        if src.name not in names:
            raise ValueError(f"{path}: missing tensor {src.name!r} in the checkpoint")
        sources[name] = src

    state: dict[str, torch.Tensor] = {}
    read: dict[Source, torch.Tensor] = {}  # so a tied head reuses the embeddings
    for name, src in sources.items():
        shape, expected = source.shape(src.name), tuple(wanted[name].shape)
        if src.total is not None:  # rows of a fused tensor: check the whole of it
            expected = (src.total, *expected[1:])
        if shape != expected:
            raise ValueError(f"{path}: tensor {src.name!r} has shape {shape}, expected {expected} from config.json")
        if src not in read:
            read[src] = source.read(src).to(device=device, dtype=dtype)
        state[name] = read[src]

    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head and embed_tokens separate Parameters
    return model.eval().requires_grad_(False)
