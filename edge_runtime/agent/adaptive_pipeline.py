"""The agent's `adaptive` pipeline (the interface: pipeline.py): a small and a big model switched per
frame by edge_runtime.vision.switch, per client stream. ONNX Runtime only; no torch.
"""
import threading
from pathlib import Path

import numpy as np

from edge_runtime.agent.pipeline import Context, Pipeline, PipelineInputError, TensorInfo, one_input
from edge_runtime.agent.policy import Decision

STREAM_PARAM = "stream"          # the request parameter naming a frame's stream (camera)
MAX_STREAM_ID = 64               # characters
MAX_STREAMS = 64                 # streams remembered per adaptive pipeline (the option max_streams)
LAYOUT = ("regression", "aux")   # the models' layout: adaptive.json's, never a switch table's


def stream_param(params: dict) -> str | None:
    """The request's stream id as text (an integer and its decimal string name the same stream), or
    None (no `stream` parameter: the default stream); PipelineInputError for anything else."""
    value = params.get(STREAM_PARAM)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PipelineInputError(f"parameter '{STREAM_PARAM}' must be a string or an integer of at most "
                                 f"{MAX_STREAM_ID} characters, got {type(value).__name__} {value!r:.80}")
    text = str(value)
    if not 1 <= len(text) <= MAX_STREAM_ID:
        raise PipelineInputError(f"parameter '{STREAM_PARAM}' must be 1 to {MAX_STREAM_ID} characters long, "
                                 f"got {len(text)}")
    return text


def read_package(folder: Path, options: dict, bad) -> tuple:
    """(input shape, SwitchConfig, cloud model or None, deadline_s, max_streams) from the folder's
    adaptive.json and the agent config's options; `bad(where, why)` makes the error to raise."""
    import json

    from edge_runtime.vision.switch import SwitchConfig
    path, agent = folder / "adaptive.json", "agent config"
    try:
        manifest = json.loads(path.read_text())
    except OSError as err:
        raise bad(path, f"cannot be read: {err.strerror or err}") from None
    except ValueError as err:                                   # JSONDecodeError, UnicodeDecodeError
        raise bad(path, f"is not JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise bad(path, f"expected a JSON object, got {type(manifest).__name__}")
    shape = manifest.get("input", {}).get("shape") if isinstance(manifest.get("input"), dict) else None
    if not isinstance(shape, list) or not shape \
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise bad(path, f"'input.shape' must be a list of whole numbers >= 1, got {shape!r}")
    if "regression" not in manifest:
        raise bad(path, "'regression' (how many regression outputs end the big model's output) is missing")
    layout = {"regression": manifest["regression"], "aux": manifest.get("aux", 0)}
    for key, value in layout.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(path, f"'{key}' must be a whole number >= 0, got {value!r}")
    settings = manifest.get("switch") or {}
    if not isinstance(settings, dict):
        raise bad(path, f"'switch' must be an object of setting: value, got {settings!r}")
    cloud_model = manifest.get("cloud_model")
    if cloud_model is not None and (not isinstance(cloud_model, str) or not cloud_model):
        raise bad(path, f"'cloud_model' must be a model name or null, got {cloud_model!r}")

    overrides = options.get("switch", {})
    if not isinstance(overrides, dict):
        raise bad(agent, f"'switch' must be a table of setting = value, got {overrides!r}")
    for where, table in ((path, settings), (agent, overrides)):
        for key in LAYOUT:
            if key in table:
                raise bad(where, f"switch setting '{key}' is the models' layout: adaptive.json's top-level "
                                 f"'{key}', not a switch setting")
    try:
        SwitchConfig.from_dict({**settings, **layout})
    except ValueError as err:
        raise bad(path, err) from None
    try:
        config = SwitchConfig.from_dict({**settings, **overrides, **layout})
    except ValueError as err:
        raise bad(f"{agent} (its switch table over adaptive.json's)", err) from None
    deadline_s = options.get("deadline_s", 0.5)
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not 0 < deadline_s < float("inf"):
        raise bad(agent, f"'deadline_s' must be a number of seconds > 0, got {deadline_s!r}")
    max_streams = options.get("max_streams", MAX_STREAMS)
    if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
        raise bad(agent, f"'max_streams' must be a whole number >= 1, got {max_streams!r}")
    return tuple(shape), config, cloud_model, float(deadline_s), max_streams


def open_models(folder: Path, shape: tuple, config, threads: int, bad) -> tuple[dict, int]:
    """({"small": session, "big": session}, the big model's output width): each loadable, with one
    input, and answering one zero frame in the layout the config says (small = big + aux values)."""
    from edge_runtime.vision.deployment import session
    sessions, widths, zero = {}, {}, np.zeros((1, *shape), np.float32)
    for which in ("small", "big"):
        file = folder / f"{which}.onnx"
        try:
            sessions[which] = sess = session(file, threads)
        except Exception as err:                # onnxruntime's NoSuchFile / InvalidProtobuf / Fail
            raise bad(file, f"cannot be loaded by ONNX Runtime: {err}") from None
        if len(sess.get_inputs()) != 1:
            raise bad(file, f"expected one input, got {len(sess.get_inputs())}")
        try:
            out = sess.run(None, {sess.get_inputs()[0].name: zero})[0]
        except Exception as err:
            raise bad(file, f"does not run on a zero frame of adaptive.json's 'input.shape' {list(shape)}: "
                            f"{err}") from None
        if out.ndim != 2 or out.shape[0] != 1:
            raise bad(file, f"answers shape {list(out.shape)} for one frame, expected [1, width]")
        widths[which] = out.shape[1]
    ws, wb, path = widths["small"], widths["big"], folder / "adaptive.json"
    if ws != wb + config.aux:
        raise bad(path, f"'aux' = {config.aux} disagrees with the models: small.onnx answers {ws} values per frame "
                        f"and big.onnx {wb}, so small = big + aux needs aux = {ws - wb}")
    if config.regression > wb:
        raise bad(path, f"'regression' = {config.regression} is more than big.onnx's {wb} outputs per frame")
    return sessions, wb


class AdaptivePipeline(Pipeline):
    """A folder from split.vision.adaptive.build_adaptive (small.onnx, big.onnx, adaptive.json): per
    frame the small model answers unless the switch's strategy (adaptive.json's `switch`, overlaid
    with the agent config's `switch` table; edge_runtime.vision.switch) escalates to the big one, or
    to the cloud's copy of it when the link is good. The device state (battery, heat, link quality)
    is the agent's, from devices.telemetry and heartbeats.

    Streams: the request parameter `stream` (a string or an integer, 1 to 64 characters; 5 and "5"
    are the same stream) names the camera a request's frames come from; without it they belong to the
    default stream. Each stream has its own switch memory (the last answer, the hold, the escalation),
    its frames are answered in order (one lock per stream), and the `max_streams` (default 64) most
    recently used are remembered: the least recently used one beyond them is forgotten (counters
    `streams_forgotten`) and starts afresh if it comes back. The models and the device state are shared.

    Input `x` (B, *input.shape), a stream's next B frames in order. Outputs `y` (B, width): the big
    model's layout (class logits, then regression), fused when both models ran; `ran` (e.g.
    b"small,cloud"); `degraded` (the cloud did not answer, the big model did, here); `predicted_error`
    (FP32, NaN where the small model did not run or has no auxiliary output): the small model's own
    predicted error on the frame.

    Opening checks everything it reads: adaptive.json (input.shape, regression, aux, switch,
    cloud_model), the agent config's options (switch, deadline_s, max_streams) and the models (one
    zero frame through each: small's width = big's + aux, regression <= big's width); a bad value is a
    ValueError naming the pipeline, the file and the field."""

    def __init__(self, name: str, folder: Path, options: dict, ctx: Context):
        from collections import OrderedDict

        from edge_runtime.vision.switch import AdaptiveSwitch, DeviceState
        super().__init__(name, "adaptive", "edgefold_adaptive")

        def bad(where, why) -> ValueError:
            return ValueError(f"pipeline '{name}': {where}: {why}")

        shape, config, cloud_model, deadline_s, max_streams = read_package(Path(folder), options, bad)
        sessions, wb = open_models(Path(folder), shape, config, ctx.threads, bad)
        self.shape, self.width, self.config, self.max_streams = shape, wb, config, max_streams
        self.client = ctx.client(deadline_s) if cloud_model and ctx.cloud else None

        def run_cloud(x):      # the cloud's copy of the big model; None: the switch runs the big one here
            import grpc
            try:
                out = self.client.infer(cloud_model, {"x": x[None]})["y"][0]
                self.counters["offloaded"] += 1
                return out
            except grpc.RpcError:
                self.counters["degraded"] += 1
                return None

        def runner(sess):
            feed = sess.get_inputs()[0].name
            return lambda x: sess.run(None, {feed: x[None]})[0][0]
        self.switch = AdaptiveSwitch(runner(sessions["small"]), runner(sessions["big"]), config,
                                     run_cloud if self.client else None)
        self.state = DeviceState()
        self._streams = OrderedDict()          # stream id (None: the default) -> (StreamState, Lock), LRU first
        self._lock = threading.Lock()          # guards _streams
        self.counters.update(streams_forgotten=0, frames=0, big_frames=0)   # big_frames: the big model (or the cloud) answered
        self.inputs = (TensorInfo("x", "FP32", (-1, *self.shape)),)
        self.outputs = (TensorInfo("y", "FP32", (-1, wb)), TensorInfo("ran", "BYTES", (-1,)),
                        TensorInfo("degraded", "BOOL", (-1,)), TensorInfo("predicted_error", "FP32", (-1,)))

    def adapt(self, decision: Decision, link) -> None:
        self.state = decision.state

    def describe(self) -> dict:
        return {"kind": self.kind, "cloud": self.client is not None, "strategy": self.config.strategy,
                "streams": len(self._streams), "max_streams": self.max_streams,
                "streams_forgotten": self.counters["streams_forgotten"],
                "big_share": self.counters["big_frames"] / max(self.counters["frames"], 1)}

    def forget_requests(self) -> None:
        with self._lock:
            self._streams.clear()

    def _stream(self, key: str | None):
        """(StreamState, Lock) of stream `key`, now the most recently used; a new one when unknown."""
        from edge_runtime.vision.switch import StreamState
        with self._lock:
            entry = self._streams.get(key)
            if entry is not None:
                self._streams.move_to_end(key)
                return entry
            entry = self._streams[key] = (StreamState(), threading.Lock())
            while len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
                self.counters["streams_forgotten"] += 1
            return entry

    def infer(self, inputs: dict, params: dict) -> dict:
        key = stream_param(params)
        x = one_input(inputs, "x", "f").astype(np.float32, copy=False)
        if x.shape[1:] != self.shape or not np.isfinite(x).all():
            raise PipelineInputError(f"input 'x': expected finite frames of shape [-1, {', '.join(map(str, self.shape))}]"
                                     f", got {list(x.shape)}")
        stream, lock = self._stream(key)
        state = self.state
        with lock:                             # one stream: its frames in order
            answers = [self.switch.step(frame, state, stream) for frame in x]
        with self._lock:                       # counters: shared by the streams
            self.counters["frames"] += len(answers)
            self.counters["big_frames"] += sum(a.ran != ("small",) for a in answers)
        ran = np.empty(len(answers), dtype=object)
        ran[:] = [",".join(a.ran).encode() for a in answers]
        y = np.stack([a.output for a in answers]).astype(np.float32) if answers else np.zeros((0, self.width), np.float32)
        return {"y": y, "ran": ran,
                "degraded": np.array([a.ran[-2:] == ("cloud", "big") for a in answers], bool),
                "predicted_error": np.array([np.nan if a.predicted_error is None else a.predicted_error
                                             for a in answers], np.float32)}

    def close(self) -> None:
        if self.client:
            self.client.close()
