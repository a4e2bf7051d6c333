"""The agent's `adaptive` pipeline (issue 18): per-stream switch memory, the three strategies on a
4-DoF regression pair whose small model has an auxiliary (predicted-error) output, and every value
of adaptive.json and the agent config checked at load. Real ONNX models (tiny random-init torch
models, fixed seeds) and a real agent called through the Open Inference Protocol with tritonclient.

    .venv/bin/python -m pytest -q tests/test_adaptive_pipeline.py
"""
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edge_runtime.agent.config import PipelineConfig
from edge_runtime.agent.pipeline import Context, PipelineInputError
from edge_runtime.agent.pipeline_factory import open_pipeline
from edge_runtime.vision.switch import SwitchConfig
from server_process import AgentProcess
from split.vision.adaptive import build_adaptive

INPUT = (1, 8, 8)
# Thresholds fitted to the models and frames below: a frame-to-frame change within a scene moves the
# small model's pose by < 0.001 and the big model answers within 0.0015 of it, a scene change moves it
# by > 0.01; the predicted error is about 0.40-0.42 on some scenes, 0.44-0.47 on others. Never frugal
# (the agent's own telemetry must not change the answers).
SETTINGS = {"max_jump": 0.005, "aux_threshold": 0.43, "hold": 2, "low_battery": 0.0, "hot_c": 1000.0}
STRATEGY_OPTIONS = {"consistency": {}, "auxiliary": {"switch": {"strategy": "auxiliary"}}, "combined": {}}
FUSE = 0.25                      # the combined package's fuse weight


class Small(nn.Module):
    """(B, 1, 8, 8) -> (B, 4 + aux): a pose in [0, 1]^4, then its predicted error."""

    def __init__(self, aux: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        self.reg = nn.Linear(16, 4)
        self.err = nn.Linear(16, aux) if aux else None

    def forward(self, x):
        h = self.body(x)
        pose = torch.sigmoid(self.reg(h))
        return torch.cat([pose, torch.sigmoid(self.err(h))], 1) if self.err is not None else pose


class Big(nn.Module):
    """(B, 1, 8, 8) -> (B, 4): the small model's pose, slightly corrected (a better model agrees with it)."""

    def __init__(self, small: Small):
        super().__init__()
        self.body, self.reg = copy.deepcopy(small.body), copy.deepcopy(small.reg)
        self.fix = nn.Linear(64, 4)

    def forward(self, x):
        return torch.sigmoid(self.reg(self.body(x))) + 0.002 * torch.tanh(self.fix(x.flatten(1)))


def stream_frames(seed: int, n: int = 12, scene_len: int = 4) -> np.ndarray:
    """A camera: a new scene every `scene_len` frames, drifting slightly in between."""
    rng = np.random.default_rng(seed)
    scenes = rng.random((n // scene_len + 1, *INPUT))
    return np.stack([scenes[i // scene_len] + 0.003 * rng.standard_normal(INPUT) for i in range(n)]).astype(np.float32)


A, B = stream_frames(1), stream_frames(2)


def onnx(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """{"consistency": package (strategy consistency), "combined": package (combined, fused),
    "no_aux": package whose small model has no auxiliary output}."""
    root = tmp_path_factory.mktemp("adaptive")
    torch.manual_seed(0)
    small = Small()
    big = Big(small)
    out = {
        "consistency": build_adaptive(small, big, root / "consistency", INPUT, switch=SETTINGS, regression=4, aux=1,
                                      validate=SwitchConfig.from_dict),
        "combined": build_adaptive(small, big, root / "combined", INPUT, regression=4, aux=1,
                                   switch={**SETTINGS, "strategy": "combined", "fuse": FUSE},
                                   validate=SwitchConfig.from_dict)}
    torch.manual_seed(1)
    plain = Small(aux=0)
    out["no_aux"] = build_adaptive(plain, Big(plain), root / "no_aux", INPUT, switch=SETTINGS, regression=4)
    return out


def package_of(strategy: str) -> str:
    return "combined" if strategy == "combined" else "consistency"


def pipeline(folder: Path, options: dict | None = None, name: str = "p"):
    return open_pipeline(PipelineConfig(name, "adaptive", path=folder, options=dict(options or {})), folder,
                         Context(None, None, None, None))


@pytest.fixture(scope="module")
def agent(packages, tmp_path_factory):
    """A real agent (no cloud) serving one adaptive pipeline per strategy; (tritonclient, process)."""
    import tritonclient.grpc as triton
    root = tmp_path_factory.mktemp("agent")
    pipes = ""
    for strategy, options in STRATEGY_OPTIONS.items():
        pipes += f'[[pipeline]]\nname = "{strategy}"\nkind = "adaptive"\npath = "{packages[package_of(strategy)]}"\n'
        if options:
            pipes += f'switch = {{ strategy = "{options["switch"]["strategy"]}" }}\n'
    config = root / "agent.toml"
    config.write_text(f'device_id = "test-cam"\nprofile = "raspberry-pi-4"\nstate_dir = "{root / "state"}"\n'
                      f'[serve]\nhost = "127.0.0.1"\nport = 0\n{pipes}')
    proc = AgentProcess(config)
    client = triton.InferenceServerClient(proc.address)
    try:
        deadline = time.monotonic() + 60
        while not all(client.is_model_ready(s) for s in STRATEGY_OPTIONS):
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.05)
        yield client, proc
    finally:
        client.close()
        assert proc.terminate() == 0, proc.output()


def call(client, model: str, frames: np.ndarray, stream=None) -> dict:
    import tritonclient.grpc as triton
    x = triton.InferInput("x", list(frames.shape), "FP32")
    x.set_data_from_numpy(frames)
    result = client.infer(model, [x], parameters=None if stream is None else {"stream": stream})
    return {name: result.as_numpy(name) for name in ("y", "ran", "degraded", "predicted_error")}


# --- streams -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", list(STRATEGY_OPTIONS))
def test_interleaved_streams_get_the_answers_each_would_get_alone(agent, packages, strategy):
    client, _ = agent
    got = {"a": [], "b": []}
    for fa, fb in zip(A, B):                                    # a, b, a, b, ... one frame per request
        got["a"].append(call(client, strategy, fa[None], "a"))
        got["b"].append(call(client, strategy, fb[None], "b"))
    for stream, frames in (("a", A), ("b", B)):
        alone = pipeline(packages[package_of(strategy)], STRATEGY_OPTIONS[strategy])
        expected = alone.infer({"x": frames}, {})               # the whole stream, alone, in one batch
        ran = [r for g in got[stream] for r in g["ran"]]
        assert ran == list(expected["ran"]), (stream, ran)
        assert any(b"big" in r for r in ran) and any(r == b"small" for r in ran), ran   # both models answered
        np.testing.assert_allclose(np.concatenate([g["y"] for g in got[stream]]), expected["y"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.concatenate([g["predicted_error"] for g in got[stream]]),
                                   expected["predicted_error"], rtol=0, atol=1e-6)
    if strategy == "consistency":          # the test can tell: one shared history answers differently
        mixed = pipeline(packages["consistency"]).infer({"x": np.stack([A, B], 1).reshape(-1, *INPUT)}, {})
        assert list(mixed["ran"][0::2]) != [r for g in got["a"] for r in g["ran"]]


def test_stream_ids_and_the_lru(packages):
    pipe = pipeline(packages["consistency"], {"max_streams": 2})
    fresh = pipeline(packages["consistency"]).infer({"x": A[4:5]}, {})["ran"]     # a first frame: small
    assert list(fresh) == [b"small"]
    pipe.infer({"x": A[:4]}, {"stream": 5})
    assert list(pipe.infer({"x": A[4:5]}, {"stream": "5"})["ran"]) == [b"small,big"]  # 5 and "5": one stream
    pipe.infer({"x": B[:1]}, {"stream": "b"})
    pipe.infer({"x": B[:1]}, {})                                 # the default stream: a third one
    assert pipe.describe()["streams"] == 2 and pipe.counters["streams_forgotten"] == 1
    assert pipe.counters["frames"] == 7 and pipe.describe()["big_share"] == pipe.counters["big_frames"] / 7 > 0
    assert list(pipe.infer({"x": A[5:6]}, {"stream": 5})["ran"]) == [b"small"]   # forgotten: afresh, no hold
    for bad in ("x" * 65, "", ["a"], True, 1.5, 10 ** 70):
        with pytest.raises(PipelineInputError, match="parameter 'stream'"):
            pipe.infer({"x": A[:1]}, {"stream": bad})
    assert pipe.infer({"x": np.zeros((0, *INPUT), np.float32)}, {})["y"].shape == (0, 4)


def test_a_smoke_inference_leaves_no_stream_history(packages):
    from edge_runtime.agent.rollout import smoke_test
    pipe = pipeline(packages["consistency"])
    smoke_test(pipe, packages["consistency"])                    # a zero frame on the default stream
    assert pipe.describe()["streams"] == 0
    fresh = pipeline(packages["consistency"])
    assert list(pipe.infer({"x": A[:6]}, {})["ran"]) == list(fresh.infer({"x": A[:6]}, {})["ran"])


def test_a_bad_stream_id_is_refused_and_the_agent_keeps_serving(agent, packages):
    from tritonclient.utils import InferenceServerException
    client, proc = agent
    for bad in ("x" * 65, True):
        with pytest.raises(InferenceServerException) as err:
            call(client, "consistency", A[:1], bad)
        assert "INVALID_ARGUMENT" in str(err.value.status()) and "parameter 'stream'" in err.value.message()
    out = [call(client, "consistency", A[i:i + 1], "c")["ran"][0] for i in range(6)]
    assert out == list(pipeline(packages["consistency"]).infer({"x": A[:6]}, {"stream": "c"})["ran"])
    assert proc.proc.poll() is None


# --- strategies ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", list(STRATEGY_OPTIONS))
def test_each_strategy_on_a_pose_pair_with_a_predicted_error(packages, strategy):
    folder = packages[package_of(strategy)]
    pipe = pipeline(folder, STRATEGY_OPTIONS[strategy])
    assert pipe.describe()["strategy"] == strategy
    frames = np.concatenate([A, B])
    out = pipe.infer({"x": frames}, {"stream": "cam0"})
    small, big = onnx(folder / "small.onnx", frames), onnx(folder / "big.onnx", frames)
    ran = [r.decode() for r in out["ran"]]
    assert out["y"].shape == (len(frames), 4) and out["predicted_error"].dtype == np.float32
    assert not out["degraded"].any()
    ran_small = np.array([r.startswith("small") for r in ran])
    np.testing.assert_allclose(out["predicted_error"][ran_small], small[ran_small, -1], rtol=0, atol=1e-6)
    assert np.isnan(out["predicted_error"][~ran_small]).all()
    only_small = np.array([r == "small" for r in ran])
    np.testing.assert_allclose(out["y"][only_small], small[only_small, :4], rtol=0, atol=1e-6)
    both, only_big = np.array([r == "small,big" for r in ran]), np.array([r == "big" for r in ran])
    fuse = FUSE if strategy == "combined" else 0.0
    np.testing.assert_allclose(out["y"][both], fuse * small[both, :4] + (1 - fuse) * big[both], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["y"][only_big], big[only_big], rtol=0, atol=1e-6)
    assert both.any() and only_small.any()
    if strategy == "combined":
        assert ran_small.all()                                  # the small model runs on every frame
    else:
        assert only_big.any()                                   # held on the big model
    if strategy == "auxiliary":       # escalations are where the predicted error is above the threshold
        assert all(small[i, -1] > SETTINGS["aux_threshold"] for i in np.flatnonzero(both))
        assert all(small[i, -1] <= SETTINGS["aux_threshold"] for i in np.flatnonzero(only_small))


def test_no_aux_output_gives_nan_predicted_errors(packages):
    out = pipeline(packages["no_aux"]).infer({"x": A}, {})
    assert np.isnan(out["predicted_error"]).all() and out["y"].shape == (len(A), 4)


# --- malformed packages and configs ----------------------------------------------------------------------
def _set(path: str, value):
    def edit(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


MANIFEST_CASES = {
    "unknown strategy": (_set("switch.strategy", "magic"), "strategy"),
    "aux strategy with aux 0": (_set("switch.strategy", "auxiliary"), "aux"),       # on the no_aux package
    "regression as a string": (_set("regression", "4"), "regression"),
    "negative hold": (_set("switch.hold", -1), "hold"),
    "unknown setting name": (_set("switch.holdd", 2), "holdd"),
    "fuse of the wrong length": (_set("switch.fuse", [0.5, 0.5]), "fuse"),
    "aux disagrees with the small model": (_set("aux", 2), "aux"),
    "input.shape not a list": (_set("input.shape", "1x8x8"), "input.shape"),
    "regression wider than the big model": (_set("regression", 5), "regression"),
    "aux in the switch table": (_set("switch.aux", 1), "aux"),
    "not JSON": (None, None),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_malformed_adaptive_json_fails_naming_the_field(packages, tmp_path, case):
    edit, field = MANIFEST_CASES[case]
    folder = Path(shutil.copytree(packages["no_aux" if "aux 0" in case else "consistency"], tmp_path / "pkg"))
    if edit is None:
        (folder / "adaptive.json").write_text("{not json")
    else:
        manifest = json.loads((folder / "adaptive.json").read_text())
        edit(manifest)
        (folder / "adaptive.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as err:
        pipeline(folder, name="cam")
    message = str(err.value)
    assert "pipeline 'cam'" in message and "adaptive.json" in message and (field is None or f"'{field}'" in message), \
        message


CONFIG_CASES = {
    "unknown strategy": ({"switch": {"strategy": "magic"}}, "strategy"),
    "aux strategy with aux 0": ({"switch": {"strategy": "combined"}}, "aux"),       # on the no_aux package
    "regression in the switch table": ({"switch": {"regression": "4"}}, "regression"),
    "negative hold": ({"switch": {"hold": -1}}, "hold"),
    "unknown setting name": ({"switch": {"holdd": 2}}, "holdd"),
    "fuse of the wrong length": ({"switch": {"fuse": [0.1, 0.2, 0.3]}}, "fuse"),
    "switch not a table": ({"switch": "hold=2"}, "switch"),
    "max_streams of 0": ({"max_streams": 0}, "max_streams"),
    "deadline_s as a string": ({"deadline_s": "fast"}, "deadline_s"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_malformed_agent_config_overrides_fail_naming_the_field(packages, case):
    options, field = CONFIG_CASES[case]
    with pytest.raises(ValueError) as err:
        pipeline(packages["no_aux" if "aux 0" in case else "consistency"], options, name="cam")
    message = str(err.value)
    assert "pipeline 'cam'" in message and "agent config" in message and f"'{field}'" in message, message


def test_build_adaptive_writes_nothing_for_bad_settings_or_a_mismatched_layout(tmp_path):
    torch.manual_seed(0)
    small = Small()
    big = Big(small)
    with pytest.raises(ValueError, match="'hold'"):
        build_adaptive(small, big, tmp_path / "a", INPUT, switch={"hold": -1}, regression=4, aux=1,
                       validate=SwitchConfig.from_dict)
    with pytest.raises(ValueError, match="aux = 0 disagrees"):
        build_adaptive(small, big, tmp_path / "b", INPUT, regression=4)
    with pytest.raises(ValueError, match="'aux' is the models' layout"):
        build_adaptive(small, big, tmp_path / "c", INPUT, switch={"aux": 1}, regression=4, aux=1)
    assert not any(tmp_path.iterdir())
    manifest = json.loads((build_adaptive(small, big, tmp_path / "d", INPUT, switch={"strategy": "auxiliary"},
                                          regression=4, aux=1) / "adaptive.json").read_text())
    assert manifest["regression"] == 4 and manifest["aux"] == 1 and manifest["switch"] == {"strategy": "auxiliary"}
