"""MLServer in a venv of its own (mlserver and tritonclient cannot share one), installed on first use
in the user's cache (~/.cache/edgefold/mlserver-venv, or $EDGEFOLD_MLSERVER_VENV), so every clone on
a machine shares one install (its packages only; each server gets its clone on PYTHONPATH), and
model repositories for it: ONNX models served by
mlserver_onnx_runtime.py, and the collaborative LLM's cloud continuation served by
cloud_service.mlserver_runtime (the venv holds torch and safetensors for it).

    why = ensure()                              # None, or why MLServer could not be installed
    cmd, env = repository(root, {"mlp": Path("mlp.onnx")}, grpc_port=8081)
    cmd, env = llm_repository(root, {"llm": {"checkpoint": "/abs/ee_lm", "first_layer": 2}}, grpc_port=8081)
    subprocess.Popen(cmd, env=env, cwd=root)    # `mlserver start ROOT`

Used by scripts/bench_cloud.py (the serving comparison), tests/test_self_contained_tail.py (a
stock server running a self-contained compressed tail) and tests/test_mlserver_llm.py (the LLM
continuation on MLServer).
"""
import fcntl
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from loadgen import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("EDGEFOLD_MLSERVER_VENV") or Path.home() / ".cache" / "edgefold" / "mlserver-venv")
INSTALLED = VENV / "edgefold-requirements.txt"   # what ensure() installed, one requirement a line
LLM_RUNTIME = "cloud_service.mlserver_runtime.LlmContinuationRuntime"


def _torch_requirement() -> str:
    """The torch this interpreter has (here the CPU build on disk, 2.13.0+cpu), pinned exactly so pip
    never resolves an unpinned torch to CUDA wheels; torch==2.13.0 (as the Makefile pins) without one."""
    try:
        return f"torch=={importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:
        return "torch==2.13.0"


# newer uvloop breaks MLServer's workers; protobuf: edgefold_proto's stubs are protobuf 6.33 gencode
# (mlserver takes protobuf < 7); torch and safetensors: split.llama, for the LLM runtime
PIP = ["mlserver==1.7.1", "uvloop==0.21.0", "onnxruntime", "numpy", "protobuf>=6.33.5,<7", _torch_requirement(),
       "safetensors>=0.4"]


def ensure(log=print) -> str | None:
    """Create VENV on first use, and bring a venv installed from another PIP list up to this one
    (one installer at a time: a lock file beside it); returns why it failed, or None."""
    wanted = "\n".join(PIP) + "\n"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / f"{VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # another clone's tests may be installing it right now
        if (VENV / "bin" / "mlserver").exists() and INSTALLED.exists() and INSTALLED.read_text() == wanted:
            return None
        log(f"installing {' '.join(PIP)} into {VENV}")
        try:
            if not (VENV / "bin" / "pip").exists():
                subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300,
                               capture_output=True, text=True)
            subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", *PIP], check=True,
                           timeout=1200, capture_output=True, text=True)
        except (subprocess.SubprocessError, OSError) as err:
            return f"cannot install MLServer into {VENV}: {err} {(getattr(err, 'stderr', '') or '')[-400:]}"
        INSTALLED.write_text(wanted)
    return None


def _write(root: Path, model_settings: dict, grpc_port: int, pythonpath: list) -> tuple[list, dict]:
    """settings.json, and ROOT/<name>/model-settings.json for each name -> settings (less the name);
    the command that serves them and its environment (PYTHONPATH: `pythonpath`)."""
    for name, settings in model_settings.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "model-settings.json").write_text(json.dumps({"name": name, **settings}, indent=1))
    (root / "settings.json").write_text(json.dumps({
        "debug": False, "parallel_workers": 0, "host": "127.0.0.1", "grpc_port": grpc_port,
        "http_port": free_port(), "metrics_port": free_port(), "load_models_at_startup": True}, indent=1))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    return [str(VENV / "bin" / "mlserver"), "start", str(root)], env


def repository(root: Path, models: dict, grpc_port: int, batching: dict | None = None) -> tuple[list, dict]:
    """Write settings.json and one model-settings.json per model (name -> ONNX path) under `root`;
    returns the command that serves them on `grpc_port` and its environment. `batching`: MLServer's
    adaptive batching settings (max_batch_size, max_batch_time) for every model."""
    return _write(root, {name: {"implementation": "mlserver_onnx_runtime.OnnxRuntimeModel",
                                "parameters": {"uri": str(Path(path).resolve()), "version": "1"}, **(batching or {})}
                         for name, path in models.items()}, grpc_port, [ROOT / "scripts"])


def llm_repository(root: Path, models: dict, grpc_port: int, settings: dict | None = None) -> tuple[list, dict]:
    """Write settings.json and one model-settings.json per LLM continuation (name -> its
    `parameters.extra`: checkpoint, first_layer, catch_up, top_k, max_sequence_idle_microseconds,
    max_state_bytes; see cloud_service/mlserver_runtime.py) under `root`; `settings`: name -> more
    model-settings fields (e.g. "inputs" declaring hidden_states FP16). Returns the command that
    serves them on `grpc_port` and its environment (PYTHONPATH: the repository root, so
    cloud_service, split and edgefold_proto import)."""
    return _write(root, {name: {"implementation": LLM_RUNTIME, "parameters": {"extra": dict(extra)},
                                **(settings or {}).get(name, {})}
                         for name, extra in models.items()}, grpc_port, [ROOT])
