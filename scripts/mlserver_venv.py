"""MLServer in a venv of its own (.cache/mlserver-venv; mlserver and tritonclient cannot share one),
installed on first use, and a repository of ONNX models for it served by mlserver_onnx_runtime.py.

    why = ensure()                              # None, or why MLServer could not be installed
    cmd, env = repository(root, {"mlp": Path("mlp.onnx")}, grpc_port=8081)
    subprocess.Popen(cmd, env=env, cwd=root)    # `mlserver start ROOT`

Used by scripts/bench_cloud.py (the serving comparison) and tests/test_self_contained_tail.py (a
stock server running a self-contained compressed tail).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from loadgen import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "mlserver-venv"
PIP = ["mlserver==1.7.1", "uvloop==0.21.0", "onnxruntime", "numpy"]  # newer uvloop breaks its workers


def ensure(log=print) -> str | None:
    """Create VENV on first use; returns why it failed, or None."""
    if (VENV / "bin" / "mlserver").exists():
        return None
    log(f"installing {' '.join(PIP)} into {VENV}")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300,
                       capture_output=True, text=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", *PIP], check=True,
                       timeout=1200, capture_output=True, text=True)
    except (subprocess.SubprocessError, OSError) as err:
        return f"cannot install MLServer into {VENV}: {err} {(getattr(err, 'stderr', '') or '')[-400:]}"
    return None


def repository(root: Path, models: dict, grpc_port: int, batching: dict | None = None) -> tuple[list, dict]:
    """Write settings.json and one model-settings.json per model (name -> ONNX path) under `root`;
    returns the command that serves them on `grpc_port` and its environment. `batching`: MLServer's
    adaptive batching settings (max_batch_size, max_batch_time) for every model."""
    for name, path in models.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        settings = {"name": name, "implementation": "mlserver_onnx_runtime.OnnxRuntimeModel",
                    "parameters": {"uri": str(Path(path).resolve()), "version": "1"}, **(batching or {})}
        (root / name / "model-settings.json").write_text(json.dumps(settings, indent=1))
    (root / "settings.json").write_text(json.dumps({
        "debug": False, "parallel_workers": 0, "host": "127.0.0.1", "grpc_port": grpc_port,
        "http_port": free_port(), "metrics_port": free_port(), "load_models_at_startup": True}, indent=1))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
    return [str(VENV / "bin" / "mlserver"), "start", str(root)], env
