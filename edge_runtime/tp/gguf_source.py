"""`--model FILE.gguf`: a GGUF file as a small model folder in the cache, its tensors read from the file.

    folder = model_folder(Path("model.gguf"), DEFAULT_GGUF_CACHE)   # a folder is returned as it is

The folder holds what the rest of the project reads from a Hugging Face checkpoint besides the weights
(config.json, tokenizer.json, tokenizer_config.json, generation_config.json, from the file's
metadata) and split.llama.gguf_checkpoint.FOLDER_INDEX, which tells split.llama.checkpoint's
tensor_source where in the .gguf each tensor lies: `tp prepare`, `tp generate --model`,
launch.cached_shards and load_llama read the tensors straight from the GGUF file, one at a time,
dequantized by the `gguf` package as they are read. No float copy of the model is written (the folder
is a few KiB beside tokenizer.json), and making it reads only the file's header. gguf.json records
the file's tensor types and what stderr says about them: weights are requantized from the dequantized
floats to --quantize if given (else kept float32, bfloat16 for an all-BF16 file), except that the
projections of a type with a kept form (gguf_checkpoint.KEPT) are taken with their integers as they
are when that format is asked (and `prepare` says so):
  Q4_0  --quantize int4 --group-size 32   same integers, scale d rounded fp16 -> bf16, zero 0
                                          (gguf_checkpoint.q4_0_as_int4)
  Q8_0  --quantize int8g --group-size 32  same integers, scale d rounded fp16 -> bf16
                                          (gguf_checkpoint.q8_0_as_int8)
The cache entry is keyed by the file's path, size, mtime and a hash of its first MiB, written under a
temporary name and renamed when complete; the index also records the file's size and mtime, and a
folder whose file changed since refuses to read it.
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
# (launch.DEFAULT_CACHE / "gguf": where `tp generate --model FILE.gguf` puts its folder with the default --cache-dir)
LAYOUT = 4  # gguf.json "layout": 2 added prequantized/, 3 its int8-g32, 4 no float copy (tensors read from the
#             file); an entry of another layout is made again


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
    """`path` itself if it is a folder; a `.gguf` file's folder under `cache_dir` (made once). `progress`
    is accepted for the callers' sake: making the folder reads only the header, with no progress bar."""
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
    make_folder(path, out, log)
    return out


def kept_formats() -> dict[str, tuple]:
    """GGUF type -> (the split.llama.quantize handler whose stored form keeps its integers, the --quantize
    options that ask for it)."""
    from split.llama.gguf_checkpoint import KEPT
    from split.llama.quantize import handler

    return {qtype: (handler(scheme, 32), f"--quantize {scheme} --group-size 32") for qtype, (scheme, _) in KEPT.items()}


def _notice(path: Path, info: dict, cached: bool = False) -> str:
    found = ", ".join(f"{k} x{v}" for k, v in sorted(info["types"].items()))
    kept = []
    for qtype, (fmt, options) in kept_formats().items():
        n = len(info.get("kept", {}).get(fmt.name, []))
        if n:
            zero = ", zero 0" if qtype == "Q4_0" else ""
            kept.append(f"with {options} its {n} {qtype} projections keep their {qtype.lower()} integers instead "
                        f"(scale d rounded fp16 -> bf16{zero})")
    return (f"edge-runtime: {path.name}: GGUF tensor types {found}, read from the file one tensor at a time and "
            f"dequantized to {info['dtype']} (by the gguf package){' (cached index)' if cached else ''}; weights "
            f"are requantized from these floats to --quantize if given, else kept {info['dtype']}"
            + "".join(f"; {k}" for k in kept))


def make_folder(path: Path, out: Path, log=None) -> Path:
    """Write the model folder for GGUF `path` at `out` (aside, then renamed): config, tokenizer files,
    the tensor index and gguf.json; no tensor data."""
    from split.llama.gguf_checkpoint import read_gguf

    g = read_gguf(path)  # every metadata / shape problem is raised here, before anything is written
    source = g.source()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "config.json").write_text(json.dumps(g.config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(g.generation_config, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(g.tokenizer_config, indent=2))
        g.tokenizer.save(str(tmp / "tokenizer.json"))
        source.write_index(tmp)
        kept = {fmt.name: sorted(n.removesuffix(".weight") for n in source.kept(fmt))
                for fmt, _ in kept_formats().values()}
        info = {"source": str(path.resolve()), "architecture": g.arch, "types": g.types,
                "dtype": str(g.dtype).removeprefix("torch."), "layout": LAYOUT, "kept": kept}
        (tmp / "gguf.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log(_notice(path, info))
    return out
