"""Tiny models and repositories the tests build themselves (no downloads)."""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
MLP_IN, MLP_HIDDEN, MLP_OUT = 16, 32, 4

# (OIP datatype, ONNX element type, numpy dtype) covered by the "types" model.
TYPES = [
    ("FP32", TensorProto.FLOAT, np.float32),
    ("FP16", TensorProto.FLOAT16, np.float16),
    ("INT8", TensorProto.INT8, np.int8),
    ("UINT8", TensorProto.UINT8, np.uint8),
    ("INT64", TensorProto.INT64, np.int64),
    ("BOOL", TensorProto.BOOL, np.bool_),
    ("BYTES", TensorProto.STRING, object),
]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp_onnx(path: Path, seed: int = 0, batch: str | int = "batch") -> Path:
    """x (B, 16) -> relu(x W1 + b1) W2 + b2 -> y (B, 4)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((MLP_IN, MLP_HIDDEN)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(MLP_HIDDEN).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((MLP_HIDDEN, MLP_OUT)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(MLP_OUT).astype(np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, MLP_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, MLP_OUT])],
        initializer=[w1, b1, w2, b2])
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def types_onnx(path: Path) -> Path:
    """One input per datatype, each returned unchanged (Identity), shape (2, 3)."""
    nodes, inputs, outputs = [], [], []
    for name, elem, _ in TYPES:
        lower = name.lower()
        inputs.append(helper.make_tensor_value_info(f"in_{lower}", elem, [2, 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{lower}", elem, [2, 3]))
        nodes.append(helper.make_node("Identity", [f"in_{lower}"], [f"out_{lower}"]))
    graph = helper.make_graph(nodes, "types", inputs, outputs)
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def constant_onnx(path: Path, value: float) -> Path:
    """x (1,) -> x + value: tells versions of one model apart."""
    c = numpy_helper.from_array(np.array([value], np.float32), "c")
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "constant",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[c])
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


COUNTER_PY = '''
import time
import torch

class RunningSum(torch.nn.Module):
    """Stateful: y = sum of every x this sequence has sent so far (state is a float64 buffer)."""
    def forward(self, x, state):
        total = state.get("total", torch.zeros_like(x, dtype=torch.float64)) + x
        state["total"] = total
        state["history"] = torch.cat([state.get("history", torch.zeros(0, dtype=torch.float64)), x.reshape(-1)])
        return total

def build_model(config):
    return RunningSum()
'''

SLOW_PY = '''
import time
import torch

class Slow(torch.nn.Module):
    """Sleeps `x` seconds then returns x: lets tests hold a request in flight."""
    def forward(self, x):
        time.sleep(float(x.reshape(-1)[0]))
        return x * 1

def build_model(config):
    return Slow()
'''


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mlp_device_package(root: Path, seed: int = 1) -> Path:
    """A repository `root` with one device package, `mlp` version 1: the cloud hands its files out to
    agents and never loads them itself (so a broken or tampered version cannot break its serving)."""
    write(root / "mlp" / "config.toml", 'backend = "device"\n')
    mlp_onnx(root / "mlp" / "1" / "model.onnx", seed=seed)
    return root


def build_repository(root: Path) -> Path:
    """The repository most server tests share."""
    mlp_onnx(root / "mlp" / "1" / "model.onnx")
    write(root / "mlp" / "config.toml", "max_batch_size = 32\n[parameters]\nintra_op_thread_count = 1\n")
    mlp_onnx(root / "mlp_batched" / "1" / "model.onnx")
    write(root / "mlp_batched" / "config.toml",
          "max_batch_size = 32\n[dynamic_batching]\nmax_queue_delay_microseconds = 20000\n"
          "[parameters]\nintra_op_thread_count = 1\n")
    types_onnx(root / "types" / "1" / "model.onnx")
    constant_onnx(root / "versioned" / "1" / "model.onnx", 1.0)
    constant_onnx(root / "versioned" / "2" / "model.onnx", 2.0)
    write(root / "counter" / "1" / "model.py", COUNTER_PY)
    write(root / "counter" / "config.toml", """
[sequence_batching]
max_sequence_idle_microseconds = 60_000_000
max_state_bytes = 4096
[[input]]
name = "x"
data_type = "TYPE_FP64"
dims = [4]
[[output]]
name = "total"
data_type = "TYPE_FP64"
dims = [4]
""")
    write(root / "slow" / "1" / "model.py", SLOW_PY)
    write(root / "slow" / "config.toml", """
[[input]]
name = "x"
data_type = "TYPE_FP32"
dims = [1]
[[output]]
name = "y"
data_type = "TYPE_FP32"
dims = [1]
""")
    return root
