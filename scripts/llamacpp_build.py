"""Building the llama.cpp benchmark peer (scripts/llamacpp_peer.py runs it): its venv, its input checkpoints
and their GGUF files, each made once under .cache/ (git-ignored).

    .venv/bin/python scripts/llamacpp_peer.py --ensure-venv     # the build alone (once, ~5-10 min on 2 cores)

ensure_venv() builds llama-cpp-python from its sdist with CMAKE_ARGS (no native AMX: it crashes on q8_0/q4_0
here) and checks llama_print_system_info() for AMX_INT8; checkpoint(shape) writes random bf16 checkpoints as
scripts/bench_prepare.py does; to_gguf(hf_dir, kind) converts with the sdist's convert_hf_to_gguf.py beside a
`tokenizers` BPE vocabulary of the model's size (write_tokenizer), then quantizes with llama_model_quantize.
The whole recipe is in llamacpp_peer.py's docstring.
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
BENCH = CACHE / "bench_llm"
VENV = CACHE / "llamacpp-venv"
SDIST_DIR = CACHE / "llamacpp-sdist"
VERSION = "0.3.36"
SDIST = SDIST_DIR / f"llama_cpp_python-{VERSION}.tar.gz"
# DESIGN.md "llama.cpp as a benchmark peer": the native build turns on ggml's AMX int8 path on this machine kind
# and then crashes in decode on every q8_0/q4_0 model; these flags keep AVX-512 (VNNI, BF16) without AMX.
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
              "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")
# what convert_hf_to_gguf.py imports besides gguf (installed from the sdist's own gguf-py); its requirements file
# pins torch 2.11 from another index: the torch of the project venv is this machine's CPU wheel, used instead
CONVERTER_PIP = ["numpy>=2.2.6,<3", "sentencepiece>=0.1.98,<0.3.0", "transformers==4.57.6", "protobuf>=4.21.0,<5.0.0"]
MARKER = VENV / "edgefold-build.json"
KINDS = ("f32", "q8_0", "q4_0")
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "336M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
}
COMMON = dict(max_position_embeddings=2048, tie_word_embeddings=False)

# scripts/bench_prepare.py's MAKE: random bf16 weights, written the way a user downloads them
MAKE = """
import json, sys, torch, transformers
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)                 # initialise in bf16: no fp32 copy of 4.4 GB
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(sys.argv[1]), torch_dtype="bfloat16"))
model.save_pretrained(sys.argv[2], safe_serialization=True, max_shard_size="1GB")
"""

# --- the tokenizer folder the converter needs ---------------------------------------------------------------
SPECIALS = ("<unk>", "<s>", "</s>")     # ids 0, 1, 2 as in Llama's vocabulary, then the 256 byte tokens
N_FIXED = len(SPECIALS) + 256


def vocabulary(vocab_size: int) -> list[str]:
    """Token of each id: <unk> <s> </s>, <0x00>..<0xFF>, then words '▁w<i>' (one pre-token, so one id each)."""
    if vocab_size <= N_FIXED:
        raise ValueError(f"a byte-fallback vocabulary needs more than {N_FIXED} tokens, not {vocab_size}")
    return [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)),
            *(f"\u2581w{i}" for i in range(vocab_size - N_FIXED))]


def write_tokenizer(folder: Path, vocab_size: int) -> Path:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json of a `tokenizers` BPE of vocab_size ids
    with no merges (ignore_merges: a word in the vocabulary is one id), byte fallback and Llama's decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    tokens = vocabulary(vocab_size)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>",
                               byte_fallback=True, ignore_merges=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", model_max_length=2048, add_bos_token=False,
        add_eos_token=False, clean_up_tokenization_spaces=False, **specials), indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    return folder


def converter_input(hf_dir: Path) -> Path:
    """<hf_dir>/gguf/hf: links to the checkpoint's files beside the tokenizer folder (hf_dir is left alone)."""
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    folder = hf_dir / "gguf" / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.is_file() and (f.suffix in (".safetensors", ".json")) and not f.name.startswith("tokenizer") \
                and f.name != "special_tokens_map.json":
            link = folder / f.name
            if not link.is_symlink():
                link.unlink(missing_ok=True)
                link.symlink_to(f.resolve())
    if not (folder / "tokenizer.json").is_file():
        write_tokenizer(folder, config["vocab_size"])
    return folder


# --- the llama.cpp venv -------------------------------------------------------------------------------------
def log(*parts) -> None:
    print("[llamacpp_peer]", *parts, file=sys.stderr, flush=True)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def fetch_sdist() -> Path:
    """The llama-cpp-python sdist from the package index (once): it is what gets built and carries the converter."""
    if not SDIST.is_file():
        SDIST_DIR.mkdir(parents=True, exist_ok=True)
        log(f"downloading the llama-cpp-python=={VERSION} sdist into {SDIST_DIR}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", str(SDIST_DIR)], check=True)
    return SDIST


def source_tree() -> Path:
    """The sdist unpacked (once); vendor/llama.cpp holds convert_hf_to_gguf.py, conversion/ and gguf-py/."""
    tree = SDIST_DIR / f"llama_cpp_python-{VERSION}"
    if not (tree / ".unpacked").exists():
        with tarfile.open(fetch_sdist()) as tar:
            tar.extractall(SDIST_DIR, filter="data")
        (tree / ".unpacked").touch()
    return tree


def converter() -> Path:
    return source_tree() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def ensure_venv(log_path: Path | None = None) -> Path:
    """Create .cache/llamacpp-venv once: llama-cpp-python built from the sdist with CMAKE_ARGS, gguf and the
    converter's requirements. Returns the venv's python. Raises RuntimeError when the build fails or has AMX."""
    want = dict(version=VERSION, cmake_args=CMAKE_ARGS)
    if MARKER.is_file() and all(json.loads(MARKER.read_text()).get(k) == v for k, v in want.items()):
        return venv_python()
    tree = source_tree()
    log_path = log_path or (CACHE / "llamacpp-build.log")
    if VENV.exists():
        shutil.rmtree(VENV)
    log(f"building llama-cpp-python=={VERSION} into {VENV} (CMAKE_ARGS={CMAKE_ARGS!r}); log: {log_path}")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install"]
    torch = f"torch=={importlib.metadata.version('torch')}"  # the CPU wheel the project venv has, not CUDA's
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, FORCE_CMAKE="1",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        for args in ([*CONVERTER_PIP, torch, str(tree / "vendor" / "llama.cpp" / "gguf-py")],
                     ["--verbose", "--no-binary", "llama-cpp-python", "--find-links", str(SDIST_DIR),
                      f"llama-cpp-python=={VERSION}"]):
            out.write(f"$ pip install {' '.join(args)}\n")
            out.flush()
            done = subprocess.run([*pip, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
            if done.returncode:
                raise RuntimeError(f"pip install {' '.join(args)} failed ({done.returncode}); see {log_path}")
    info = system_info()
    if "AMX_INT8 = 1" in info:
        raise RuntimeError(f"llama.cpp was built with AMX int8, which crashes on q8_0/q4_0 here: {info}")
    MARKER.write_text(json.dumps(dict(want, build_s=round(time.perf_counter() - t0, 1), system_info=info,
                                      pip_freeze=pip_freeze()), indent=1))
    log(f"built in {time.perf_counter() - t0:.0f} s; system info: {info}")
    return venv_python()


def pip_freeze() -> list[str]:
    done = subprocess.run([str(venv_python()), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def system_info() -> str:
    done = subprocess.run([str(venv_python()), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info()"
                           ".decode())"], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def in_venv(code: str, *args: str, timeout: float = 1800, env: dict | None = None) -> dict:
    """Run code in the llama.cpp venv (env: extra environment variables); its last stdout line is JSON."""
    done = subprocess.run([str(ensure_venv()), "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"llama.cpp venv child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- checkpoints and GGUF -----------------------------------------------------------------------------------
def checkpoint(shape: str, cache: Path = BENCH) -> Path:
    """The random bf16 checkpoint of a shape, written once (1.1B is scripts/bench_prepare.py's)."""
    path = Path(cache) / shape
    if not (path / "config.json").is_file():
        log(f"writing the {shape}-shaped bf16 checkpoint (once) ...")
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-c", MAKE, json.dumps({**SHAPES[shape], **COMMON}), str(tmp)], check=True)
        tmp.rename(path)
    return path


QUANTIZE = """
import ctypes, json, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
params.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
print(json.dumps(dict(rc=rc)))
"""

TENSOR_TYPES = """
import collections, json, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
print(json.dumps(dict(collections.Counter(t.tensor_type.name for t in r.tensors))))
"""


def to_gguf(hf_dir: Path, kind: str, threads: int = 2) -> Path:
    """<hf_dir>/gguf/model-<kind>.gguf, made once: f32 by the sdist's convert_hf_to_gguf.py, q8_0 and q4_0 from
    the f32 file by llama_cpp.llama_model_quantize."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    hf_dir = Path(hf_dir)
    out = hf_dir / "gguf" / f"model-{kind}.gguf"
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    t0 = time.perf_counter()
    if kind == "f32":
        folder = converter_input(hf_dir)
        log(f"converting {hf_dir} to {out.name} with {converter().relative_to(SDIST_DIR)}")
        done = subprocess.run([str(ensure_venv()), str(converter()), str(folder), "--outtype", "f32",
                               "--outfile", str(tmp)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}): {done.stderr[-3000:]}")
    else:
        src = to_gguf(hf_dir, "f32", threads)
        log(f"quantizing {src.name} to {out.name} with llama_model_quantize")
        rc = in_venv(QUANTIZE, str(src), str(tmp), FTYPES[kind], str(threads))["rc"]
        if rc:
            raise RuntimeError(f"llama_model_quantize({kind}) returned {rc}")
    tmp.rename(out)
    log(f"{out} written in {time.perf_counter() - t0:.0f} s, {out.stat().st_size / 2**20:.0f} MiB")
    return out


def tensor_types(gguf_path: Path) -> dict:
    return in_venv(TENSOR_TYPES, str(gguf_path))


# --- running ------------------------------------------------------------------------------------------------
