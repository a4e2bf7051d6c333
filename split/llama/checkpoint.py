"""Load a Hugging Face Llama/Mistral/Qwen2 folder into split.llama.Llama, only the parts it holds.

    model = load_llama("path/to/hf_folder")                                   # the whole model
    device_part = load_llama(path, layers=range(0, 4), with_head=False)        # embed + layers 0..3
    cloud_part = load_llama(path, layers=range(4, 32), with_embed=False)       # layers 4..31 + head

The folder holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Tensors are read with safetensors' safe_open (memory-mapped, no
pickle); shards that hold none of the wanted tensors are never opened. The model is built on the
meta device first, so no memory is spent on weights that are then overwritten.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import LlamaConfig
from .model import Llama

ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Present in some older checkpoints, recomputed by the model: skipped, not "unexpected".
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face one: "layers.0.mlp.up_proj.weight" -> "model.layers.0...."."""
    return name if name.startswith("lm_head.") else "model." + name


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
    path = Path(path)
    config = LlamaConfig.from_dir(path)
    with torch.device("meta"):
        model = Llama(config, layers=layers, with_embed=with_embed, with_head=with_head)
        all_names = {hf_name(n) for n in Llama(config).state_dict()}  # the whole model, never allocated

    files = checkpoint_index(path)
    unexpected = sorted(n for n in files if n not in all_names and not _IGNORED.search(n))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) for a {config.model_type} model: {unexpected[:5]}"
                         + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))

    # Which checkpoint tensor feeds each of our parameters (a tied head may read the embeddings).
    wanted = model.state_dict()  # name -> meta tensor with the expected shape
    sources: dict[str, str] = {}
    for name in wanted:
        src = hf_name(name)
        if src not in files and name == "lm_head.weight" and config.tie_word_embeddings:
            src = "model.embed_tokens.weight"
        if src not in files:
            raise ValueError(f"{path}: missing tensor {hf_name(name)!r} in the checkpoint")
        sources[name] = src

    by_file: dict[Path, list[str]] = {}
    for name, src in sources.items():
        by_file.setdefault(files[src], []).append(name)
    state: dict[str, torch.Tensor] = {}
    read: dict[str, torch.Tensor] = {}  # checkpoint name -> tensor, so a tied head reuses the embeddings
    for file, names in sorted(by_file.items()):
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard {file} (listed in the index) does not exist")
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names:
                src = sources[name]
                shape = tuple(f.get_slice(src).get_shape())
                if shape != tuple(wanted[name].shape):
                    raise ValueError(f"{path}: tensor {src!r} has shape {shape}, expected "
                                     f"{tuple(wanted[name].shape)} from config.json")
                if src not in read:
                    read[src] = f.get_tensor(src).to(dtype)
                state[name] = read[src]

    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head and embed_tokens separate Parameters
    return model.eval().requires_grad_(False)
