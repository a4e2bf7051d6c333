"""`--model FILE.gguf`: a GGUF file converted once into a Hugging Face folder in the cache.

    folder = model_folder(Path("model.gguf"), DEFAULT_GGUF_CACHE)   # a folder is returned as it is

The folder (config.json, model*.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) is what the rest of the project reads from a Hugging Face checkpoint, so
`tp prepare`, `tp generate --model` and launch.cached_shards take a GGUF as they take a folder. Every
GGUF tensor type is dequantized by the `gguf` package (split.llama.gguf_checkpoint), stored float32
(bfloat16 for an all-BF16 file), and said so on stderr with the types found; `--quantize` then
requantizes from those floats like any checkpoint, except that the projections of a type with a kept
form (gguf_checkpoint.KEPT) are also stored with their integers as they are, under
PREQUANTIZED/<format name>/model*.safetensors, which `prepare` takes instead of requantizing when that
format is asked (and says so):
  Q4_0  PREQUANTIZED/int4-g32/  --quantize int4 --group-size 32   same integers, scale d rounded fp16 -> bf16,
                                                                  zero 0 (gguf_checkpoint.q4_0_as_int4)
  Q8_0  PREQUANTIZED/int8-g32/  --quantize int8g --group-size 32  same integers, scale d rounded fp16 -> bf16
                                                                  (gguf_checkpoint.q8_0_as_int8)
Other types (and these, for any other format) are requantized from the floats. The cache entry is
keyed by the file's path, size, mtime and a hash of its first MiB, written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_GGUF_CACHE = Path(os.environ.get("EDGEFOLD_CACHE", Path.home() / ".cache" / "edgefold")) / "tp-shards" / "gguf"
# (launch.DEFAULT_CACHE / "gguf": where `tp generate --model FILE.gguf` converts it with the default --cache-dir)
SHARD_BYTES = 1 << 30  # safetensors files of about 1 GiB: memory stays at about one of them
LAYOUT = 3  # gguf.json "layout": 2 added PREQUANTIZED, 3 its int8-g32; an older cache entry is converted again
PREQUANTIZED = "prequantized"  # (edge_runtime.tp.prepare reads <folder>/prequantized/<format name>/)


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() == ".gguf"


def cache_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return f"{path.stem[:40]}-{h.hexdigest()[:16]}"


def model_folder(path: str | Path, cache_dir: str | Path = DEFAULT_GGUF_CACHE, progress: bool = True,
                 log=None) -> Path:
    """`path` itself if it is a folder; a `.gguf` file's converted folder under `cache_dir` (made once)."""
    path = Path(path)
    if not is_gguf(path):
        return path
    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(cache_dir) / cache_key(path)
    if (out / "config.json").is_file() and (out / "gguf.json").is_file():
        info = json.loads((out / "gguf.json").read_text())
        if info.get("layout") == LAYOUT:
            log(_notice(path, info, cached=True))
            return out
    convert(path, out, progress, log)
    return out


def kept_formats() -> dict[str, tuple[str, str]]:
    """GGUF type -> (its kept format's name, the --quantize options that ask for it)."""
    from split.llama.gguf_checkpoint import KEPT
    from split.llama.quantize import handler

    return {qtype: (handler(scheme, 32).name, f"--quantize {scheme} --group-size 32")
            for qtype, (scheme, _) in KEPT.items()}


def _notice(path: Path, info: dict, cached: bool = False) -> str:
    found = ", ".join(f"{k} x{v}" for k, v in sorted(info["types"].items()))
    kept = []
    for qtype, (name, options) in kept_formats().items():
        n = len(info.get("kept", {}).get(name, []))
        if n:
            zero = ", zero 0" if qtype == "Q4_0" else ""
            kept.append(f"with {options} its {n} {qtype} projections keep their {qtype.lower()} integers instead "
                        f"(scale d rounded fp16 -> bf16{zero})")
    return (f"edge-runtime: {path.name}: GGUF tensor types {found} dequantized to {info['dtype']} "
            f"(by the gguf package){' (cached)' if cached else ''}; weights are requantized from these floats "
            f"to --quantize if given, else kept {info['dtype']}" + "".join(f"; {k}" for k in kept))


def convert(path: Path, out: Path, progress: bool = True, log=None) -> Path:
    """Write the Hugging Face folder for GGUF `path` at `out` (aside, then renamed)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from split.llama.gguf_checkpoint import read_gguf

    g = read_gguf(path)  # every metadata / shape problem is raised here, before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "config.json").write_text(json.dumps(g.config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(g.generation_config, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(g.tokenizer_config, indent=2))
        g.tokenizer.save(str(tmp / "tokenizer.json"))
        shards: list[dict] = [{}]
        size = 0
        n = sum(g.types.values())
        for name, t in tqdm(g.tensors(), total=n, desc=f"convert {path.name}", unit="tensor", disable=not progress):
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > SHARD_BYTES:
                _save(tmp, shards, save_file)
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous()
            size += nbytes
        _save(tmp, shards, save_file, last=True)
        kept = {name: _save_prequantized(tmp / PREQUANTIZED / name, g.kept_projections(qtype), save_file)
                for qtype, (name, _) in kept_formats().items()}
        dtype = "bfloat16" if str(g.dtype) == "torch.bfloat16" else "float32"
        info = {"source": str(path.resolve()), "architecture": g.arch, "types": g.types, "dtype": dtype,
                "layout": LAYOUT, "kept": kept}
        (tmp / "gguf.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log(_notice(path, info))
    return out


def _save_prequantized(folder: Path, modules, save_file) -> list[str]:
    """(module name, stored tensors) pairs as a checkpoint folder of `<module>.weight/.scales[/.zeros]`
    (written only if there is one); returns the module names."""
    names: list[str] = []
    shards: list[dict] = [{}]
    size = 0
    for module, tensors in modules:
        if not names:
            folder.mkdir(parents=True)
        names.append(module)
        nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            _save(folder, shards, save_file)
            shards.append({})
            size = 0
        shards[-1].update({f"{module}.{k}": v.contiguous() for k, v in tensors.items()})
        size += nbytes
    if names:
        _save(folder, shards, save_file, last=True)
    return names


def _save(folder: Path, shards: list[dict], save_file, last: bool = False) -> None:
    """Write the newest shard (as model-0000i.safetensors); at the end, the index, or one model.safetensors."""
    i = len(shards)
    if shards[-1]:
        save_file(shards[-1], folder / f"model-{i:05d}.safetensors")
        shards[-1] = {k: None for k in shards[-1]}  # its tensors are freed; the names stay for the index
    if not last:
        return
    if len(shards) == 1:
        (folder / "model-00001.safetensors").rename(folder / "model.safetensors")
        return
    weight_map = {name: f"model-{j + 1:05d}.safetensors" for j, s in enumerate(shards) for name in s}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
