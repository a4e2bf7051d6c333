"""`agent.toml`: what one device runs. Errors name the file and the field.

    device_id = "pi-kitchen-1"
    profile = "raspberry-pi-4"          # a devices/ profile name, or a probed .toml (edge-runtime probe)
    state_dir = "agent-state"           # pulled models live here (relative to this file)
    link = "wifi"                       # the profile's link to plan with until heartbeats measure the RTT

    [cloud]
    address = "127.0.0.1:8001"
    token_file = "token.txt"            # optional: bearer token for the cloud
    tls_ca = "ca.pem"                   # optional: connect with TLS
    tls_cert = "device.pem"             # optional, with tls_key and tls_ca: a client certificate whose
    tls_key = "device.key"              #   common name is device_id (a cloud with --tls-client-ca), no token
    timeout_s = 2.0                     # deadline of every control call (heartbeat, manifest)
    heartbeat_s = 5.0
    update_s = 60.0                     # how often to look for new model versions

    [serve]                             # local apps call this with the Open Inference Protocol
    host = "127.0.0.1"
    port = 8011
    http_port = 8080                    # optional: the OpenAI-compatible HTTP API (absent: none)
    token_file = "serve-token.txt"      # optional: a bearer token both ports then require
    max_queue = 8                       # HTTP requests per LLM pipeline, waiting + running (over: 429)

    [policy]                            # how device state moves work between device and cloud
    low_battery = 0.2                   # below (0..1, on battery): plan for energy, not latency
    hot_c = 80.0                        # above: the same
    min_link_quality = 0.3              # below: keep every frame on the device

    [trust]                             # optional: install only model versions signed by one of these
    keys = ["ed25519:3q2+7w..."]        #   publisher keys (`cloud-service keygen` prints them); absent:
                                        #   any version the cloud serves, unsigned included

    [[pipeline]]
    name = "digits"                     # the model name apps use
    kind = "split"                      # local | early-exit | split | edvit | adaptive | llm | collab-llm | tp
    model = "digits-device"             # pulled from the cloud's repository (or path = "local/folder")
    placement = "auto"                  # split: a placement string or "auto" (the planner picks)
    deadline_s = 0.3

Options per kind (any other key is kept in PipelineConfig.options and ignored by other kinds):
    local        slowdown = 1.0 | "profile" (stretch its compute to the profile's speed: emulation)
    early-exit   exit_thresholds = { stage1 = 0.9 } (over the deployment's calibrated ones),
                 slowdown = 1.0 | "profile" (stretch device compute to the profile's speed: emulation)
    split        the same, plus placement, deadline_s, accuracy_floor (for "auto")
    edvit        peers = ["host:port", ...] (the agents serving the package's sub-models, in its order:
                 split.vision.edvit_deploy), deadline_s = 0.5 (a later peer counts as missing)
    adaptive     switch = { strategy = "combined", aux_threshold = 0.05, hold = 2, fuse = 0.3 } (over
                 adaptive.json's: edge_runtime.vision.switch.SwitchConfig's names but regression and aux,
                 checked when the pipeline opens), deadline_s (the cloud's copy of the big model),
                 max_streams = 64 (the streams, named by the request parameter `stream`, it remembers)
    llm          a Llama-family HF checkpoint on this device alone: quantize = "int8" | "int8g" | "int4",
                 group_size = 32, window (blocks resident; 0 or absent: all), dtype = "fp32" | "bf16",
                 max_new_tokens, cache_dir (where its blocks are prepared; default: the tp CLI's cache)
    collab-llm   mode = "collaborative" | "standalone" | "cloud-only", threshold (default: calibrated),
                 metric = "max_prob" | "entropy", cloud_model = "llm", deadline_s, max_new_tokens,
                 quantize = "int8" | "int4" (the device half from tp prepare's blocks), group_size = 32
    tp           without peers: a `tp prepare` output, its other ranks started here on loopback;
                 peers = ["host:port", ...] (elastic peers, `tp worker --model --listen`) or discover = N
                 (peers advertised on the network; known_peers, trust_on_first_use, discover_timeout_s):
                 the model itself, run by a group that survives a lost peer (quantize, group_size,
                 profile = this device's, cache_dir); master = "host:port",
                 window (default: the plan's, from tp prepare --max-rank-memory),
                 payload = "fp32" | "fp16" | "int8", dtype = "fp32" | "bf16" (float weights; the weight
                 format itself is the prepared folder's), timeout_s, join_timeout_s, max_new_tokens,
                 curve_keys = "/path/keys" (tp keys; needed with peers beyond loopback, unless insecure = true)
    llm, collab-llm and tp also take max_queue (over [serve]'s, for this pipeline's HTTP requests)
"""
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from edgefold_proto.fleet import DEVICE_ID
from edgefold_proto.signing import key_id, parse_public_key

KINDS = ("local", "early-exit", "split", "edvit", "adaptive", "llm", "collab-llm", "tp")
_ID = DEVICE_ID   # device ids and pipeline names follow the fleet protocol's rule


class AgentConfigError(ValueError):
    pass


@dataclass(frozen=True)
class CloudConfig:
    address: str | None = None          # None: no cloud at all (standalone device)
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None        # the device's client certificate (PEM), with tls_key
    tls_key: Path | None = None
    timeout_s: float = 2.0
    heartbeat_s: float = 5.0
    update_s: float = 60.0


@dataclass(frozen=True)
class PolicyConfig:
    low_battery: float = 0.2
    hot_c: float = 80.0
    min_link_quality: float = 0.3


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    kind: str
    model: str | None = None            # pulled from the cloud
    version: str = ""
    path: Path | None = None            # or a folder already on the device
    options: dict = field(default_factory=dict)    # kind-specific keys (placement, threshold, ...)


@dataclass(frozen=True)
class AgentConfig:
    file: Path
    device_id: str
    profile: str
    state_dir: Path
    link: str
    host: str
    port: int
    cloud: CloudConfig
    policy: PolicyConfig
    pipelines: tuple[PipelineConfig, ...]
    http_port: int | None = None        # the OpenAI-compatible HTTP API on [serve] host (None: off)
    token_file: Path | None = None      # [serve]: the bearer token of both local ports (None: open)
    max_queue: int = 8                  # [serve]: HTTP requests per LLM pipeline, waiting + running
    trust_keys: tuple[str, ...] = ()    # [trust] keys, canonical "ed25519:..." (empty: unsigned allowed)


def _get(table: dict, key: str, kind, where: str, default=None, required: bool = False):
    value = table.get(key, default)
    if value is None:
        if required:
            raise AgentConfigError(f"{where}: '{key}' is required")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise AgentConfigError(f"{where}: '{key}' must be {expected}, got {value!r}")
    return value


def _positive(value: float, where: str, key: str) -> float:
    if value <= 0:
        raise AgentConfigError(f"{where}: '{key}' must be > 0, got {value}")
    return value


def _queue(value: int, where: str) -> int:
    if value < 1:
        raise AgentConfigError(f"{where}: 'max_queue' must be >= 1, got {value}")
    return value


def _trust_keys(data: dict, where: str) -> tuple[str, ...]:
    """[trust] keys: each an "ed25519:<base64 of 32 bytes>" public key, written back canonically."""
    if "trust" not in data:
        return ()
    t = data["trust"]
    if not isinstance(t, dict):
        raise AgentConfigError(f"{where}: [trust] must be a table with 'keys'")
    keys = _get(t, "keys", list, f"{where} [trust]", required=True)
    if not keys:
        raise AgentConfigError(f"{where} [trust]: 'keys' is empty; list at least one publisher key, or remove "
                               "[trust] to install unsigned versions")
    parsed = []
    for i, text in enumerate(keys):
        try:
            parsed.append(key_id(parse_public_key(text, f"{where}: [trust] keys[{i}]")))
        except ValueError as err:
            raise AgentConfigError(str(err)) from None
    return tuple(dict.fromkeys(parsed))


def load_agent_config(path) -> AgentConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise AgentConfigError(f"{path}: cannot read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise AgentConfigError(f"{path}: not valid TOML: {err}") from None
    base = path.resolve().parent
    where = str(path)
    device_id = _get(data, "device_id", str, where, required=True)
    if not _ID.match(device_id):
        raise AgentConfigError(f"{where}: device_id '{device_id}' must be letters, digits, '_', '.', '-' (<= 64)")

    c = data.get("cloud", {})
    w = f"{path} [cloud]"
    cloud = CloudConfig(
        address=_get(c, "address", str, w),
        token_file=base / _get(c, "token_file", str, w) if "token_file" in c else None,
        tls_ca=base / _get(c, "tls_ca", str, w) if "tls_ca" in c else None,
        tls_cert=base / _get(c, "tls_cert", str, w) if "tls_cert" in c else None,
        tls_key=base / _get(c, "tls_key", str, w) if "tls_key" in c else None,
        timeout_s=_positive(_get(c, "timeout_s", float, w, 2.0), w, "timeout_s"),
        heartbeat_s=_positive(_get(c, "heartbeat_s", float, w, 5.0), w, "heartbeat_s"),
        update_s=_positive(_get(c, "update_s", float, w, 60.0), w, "update_s"))
    if (cloud.tls_cert is None) != (cloud.tls_key is None):
        raise AgentConfigError(f"{w}: 'tls_cert' and 'tls_key' go together (the client certificate and its key)")
    if cloud.tls_cert is not None and cloud.tls_ca is None:
        raise AgentConfigError(f"{w}: 'tls_cert' needs 'tls_ca' (a client certificate is presented over TLS only)")
    trust_keys = _trust_keys(data, where)

    s = data.get("serve", {})
    w = f"{path} [serve]"
    port = _get(s, "port", int, w, 8011)
    if not 0 <= port < 65536:
        raise AgentConfigError(f"{w}: 'port' must be 0..65535, got {port}")
    http_port = _get(s, "http_port", int, w)
    if http_port is not None and not 0 <= http_port < 65536:
        raise AgentConfigError(f"{w}: 'http_port' must be 0..65535, got {http_port}")
    token_file = base / _get(s, "token_file", str, w) if "token_file" in s else None
    max_queue = _queue(_get(s, "max_queue", int, w, 8), w)

    p = data.get("policy", {})
    w = f"{path} [policy]"
    policy = PolicyConfig(_get(p, "low_battery", float, w, 0.2), _get(p, "hot_c", float, w, 80.0),
                          _get(p, "min_link_quality", float, w, 0.3))

    pipelines, names = [], set()
    for i, entry in enumerate(data.get("pipeline", [])):
        w = f"{path} [[pipeline]] #{i + 1}"
        name = _get(entry, "name", str, w, required=True)
        if not _ID.match(name) or name in names:
            raise AgentConfigError(f"{w}: name '{name}' must be unique letters, digits, '_', '.', '-'")
        names.add(name)
        kind = _get(entry, "kind", str, w, required=True)
        if kind not in KINDS:
            raise AgentConfigError(f"{w}: kind '{kind}' is not one of {', '.join(KINDS)}")
        model, local = _get(entry, "model", str, w), _get(entry, "path", str, w)
        if (model is None) == (local is None):
            raise AgentConfigError(f"{w}: give exactly one of 'model' (pulled from the cloud) or 'path'")
        if model is not None and cloud.address is None:
            raise AgentConfigError(f"{w}: 'model' is pulled from the cloud, but [cloud] has no 'address'")
        options = {k: v for k, v in entry.items() if k not in ("name", "kind", "model", "version", "path")}
        if "max_queue" in options:
            _queue(_get(options, "max_queue", int, w), w)
        pipelines.append(PipelineConfig(name, kind, model, str(_get(entry, "version", (str, int), w, "")),
                                        base / local if local else None, options))
    if not pipelines:
        raise AgentConfigError(f"{path}: needs at least one [[pipeline]]")

    return AgentConfig(path, device_id, _get(data, "profile", str, str(path), "raspberry-pi-4"),
                       base / _get(data, "state_dir", str, str(path), "agent-state"),
                       _get(data, "link", str, str(path), "wifi"),
                       _get(s, "host", str, f"{path} [serve]", "127.0.0.1"), port, cloud, policy, tuple(pipelines),
                       http_port, token_file, max_queue, trust_keys)
