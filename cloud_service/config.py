"""A model's configuration: `DIR/<model>/config.toml`, with Triton's field names.

    backend = "onnxruntime"            # or "pytorch", "llm_continuation", "llm_stream"; default from the files present;
                                       # "device": a package devices download (Fleet), not served here
    max_batch_size = 32                # 0: the model takes no batch dimension
    [dynamic_batching]                 # present: merge concurrent requests
    max_queue_delay_microseconds = 500
    [sequence_batching]                # present: a stateful model keyed by sequence_id
    max_sequence_idle_microseconds = 60_000_000
    max_state_bytes = 268_435_456      # session memory budget (ours; Triton has none)
    [[input]]
    name = "x"
    data_type = "TYPE_FP32"            # or "FP32"
    dims = [784]                       # without the batch dimension; -1 is variable
    allow_non_finite = false           # ours: NaN/Inf inputs are rejected unless true
    optional = false                   # Triton's: a request may leave this input out
    [[output]]
    name = "y"
    data_type = "TYPE_FP32"
    dims = [10]
    [model_transaction_policy]         # Triton's name: decoupled = true lets a request get 0..N
    decoupled = true                   # responses (ModelStreamInfer only; the last is flagged final)
    [instance_group]
    count = 1                          # concurrent executions of this model
    [parameters]                       # backend specific, e.g. intra_op_thread_count = 1
"""
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from edgefold_proto.tensors import DTYPES

BACKENDS = ("onnxruntime", "pytorch", "llm_continuation", "llm_stream", "device")
DEVICE_BACKEND = "device"   # a device-only package: downloadable through Fleet, never served by the cloud


class ConfigError(ValueError):
    """A model's config.toml (or model file) is wrong; the message names the file and field."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str              # OIP name: FP32, INT64, BYTES, ...
    dims: tuple[int, ...]      # without the batch dimension when the model batches
    allow_non_finite: bool = False
    optional: bool = False     # a request may leave it out


@dataclass
class ModelConfig:
    name: str
    backend: str = ""
    max_batch_size: int = 0
    max_queue_delay_us: int | None = None        # set: dynamic batching is on
    sequence_idle_us: int | None = None          # set: stateful (sessions)
    max_state_bytes: int = 256 << 20
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    instance_count: int = 1
    parameters: dict = field(default_factory=dict)
    decoupled: bool = False                      # 0..N responses per request, over ModelStreamInfer

    @property
    def dynamic_batching(self) -> bool:
        return self.max_queue_delay_us is not None and self.max_batch_size > 0

    @property
    def stateful(self) -> bool:
        return self.sequence_idle_us is not None


def _datatype(value, where: str) -> str:
    name = str(value).removeprefix("TYPE_").upper()
    name = {"STRING": "BYTES"}.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"{where}: data_type '{value}' is not one of {', '.join('TYPE_' + d for d in DTYPES)}")
    return name


def _tensors(entries, kind: str, path: Path) -> list[TensorSpec]:
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: '{kind}' must be an array of tables ([[{kind}]])")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{path}: {kind}[{i}]"
        if "name" not in entry:
            raise ConfigError(f"{where}: missing 'name'")
        dims = entry.get("dims")
        if not isinstance(dims, list) or not all(isinstance(d, int) and (d > 0 or d == -1) for d in dims):
            raise ConfigError(f"{where} ('{entry['name']}'): 'dims' must be a list of positive ints or -1, got {dims!r}")
        specs.append(TensorSpec(entry["name"], _datatype(entry.get("data_type"), where), tuple(dims),
                                bool(entry.get("allow_non_finite", False)), bool(entry.get("optional", False))))
    return specs


def _int(table: dict, key: str, path: Path, default=None, minimum=0):
    value = table.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{path}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def load_config(model_dir: Path) -> ModelConfig:
    """Read `model_dir/config.toml` if present; an absent file gives the defaults."""
    path = model_dir / "config.toml"
    config = ModelConfig(name=model_dir.name)
    if not path.exists():
        return config
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    config.backend = data.get("backend", "")
    if config.backend and config.backend not in BACKENDS:
        raise ConfigError(f"{path}: backend '{config.backend}' is not one of {', '.join(BACKENDS)}")
    config.max_batch_size = _int(data, "max_batch_size", path, 0)
    if "dynamic_batching" in data:
        config.max_queue_delay_us = _int(data["dynamic_batching"], "max_queue_delay_microseconds", path, 0)
    if "sequence_batching" in data:
        seq = data["sequence_batching"]
        config.sequence_idle_us = _int(seq, "max_sequence_idle_microseconds", path, 60_000_000, 1)
        config.max_state_bytes = _int(seq, "max_state_bytes", path, config.max_state_bytes, 1)
    config.inputs = _tensors(data.get("input", []), "input", path)
    config.outputs = _tensors(data.get("output", []), "output", path)
    config.instance_count = _int(data.get("instance_group", {}), "count", path, 1, 1)
    policy = data.get("model_transaction_policy", {})
    decoupled = policy.get("decoupled", False) if isinstance(policy, dict) else None
    if not isinstance(decoupled, bool):
        raise ConfigError(f"{path}: 'model_transaction_policy.decoupled' must be true or false, got {decoupled!r}")
    config.decoupled = decoupled
    config.parameters = dict(data.get("parameters", {}))
    if config.dynamic_batching and config.stateful:
        raise ConfigError(f"{path}: a model has either [dynamic_batching] or [sequence_batching], not both")
    return config
