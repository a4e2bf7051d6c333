"""A split deployment on the device: the ONNX stage chain, exits, bottleneck encoders, and the
cloud model names, read from `deployment.json` (written by split.vision.deploy). No torch.

    dep = Deployment.load("deploy/res_cnn/device")
    y, exit_logits = dep.run_stage(0, x)
    dep.tail_model("stage2", "int8", "inputs")     # the cloud model for that cut, codec and form

Codec forms (how a quantized activation travels; deployment.json's "codec_form" is the default):
    parameters  the wire tensor "z" with codec parameters (scale, zero_point, ...): cloud-service
    inputs      a self-contained tail (split.vision.dequant_tail): inputs "z_q" UINT8 (the wire
                tensor), "z_scale" FP32 (C,), "z_zero_point" UINT8 (C,): any OIP server
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

CODEC_FORMS = ("parameters", "inputs")


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Stage:
    name: str
    session: ort.InferenceSession
    has_exit: bool
    output_shape: list


@dataclass
class Deployment:
    root: Path
    manifest: dict
    stages: list[Stage]
    encoders: dict[str, ort.InferenceSession] = field(default_factory=dict)

    @classmethod
    def load(cls, root, threads: int = 1) -> "Deployment":
        root = Path(root)
        path = root / "deployment.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read the deployment manifest: {err}") from None
        for key in ("model", "input", "stages", "cuts", "bottlenecks", "full_model", "thresholds"):
            if key not in manifest:
                raise ValueError(f"{path}: missing field '{key}'")
        if manifest.get("codec_form", "parameters") not in CODEC_FORMS:
            raise ValueError(f"{path}: 'codec_form' is {manifest['codec_form']!r}, expected one of "
                             f"{', '.join(CODEC_FORMS)}")
        stages = [Stage(s["name"], session(root / s["file"], threads), bool(s["exit"]), s["output_shape"])
                  for s in manifest["stages"]]
        encoders = {key: session(root / b["file"], threads) for key, b in manifest["bottlenecks"].items()}
        return cls(root, manifest, stages, encoders)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_index(self, name: str) -> int:
        if name not in self.stage_names:
            raise ValueError(f"stage '{name}' is not in deployment '{self.manifest['model']}' "
                             f"(stages: {', '.join(self.stage_names)})")
        return self.stage_names.index(name)

    @property
    def codec_form(self) -> str:
        return self.manifest.get("codec_form", "parameters")

    def tail_model(self, stage: str, codec: str, form: str, bottleneck: str | None = None) -> str:
        """The cloud model for the cut after `stage` (or the bottleneck `bottleneck` there, a key like
        "stage2_b8"), sent `codec` in `form` (CODEC_FORMS)."""
        if form not in CODEC_FORMS:
            raise ValueError(f"codec form '{form}': expected one of {', '.join(CODEC_FORMS)}")
        if bottleneck is not None:
            found = self.manifest["bottlenecks"]
            if bottleneck not in found:
                raise ValueError(f"no bottleneck '{bottleneck}' in the deployment (it has {', '.join(found) or 'none'})")
            plain, contained, what = found[bottleneck]["tail_model"], found[bottleneck].get("self_contained", {}), \
                f"bottleneck '{bottleneck}'"
        else:
            cuts = self.manifest["cuts"]
            if stage not in cuts:
                raise ValueError(f"the deployment has no tail after '{stage}' (cuts: {', '.join(cuts)})")
            plain, contained, what = cuts[stage], self.manifest.get("self_contained", {}).get(stage, {}), \
                f"'{stage}'"
        if form == "parameters" or codec == "fp32":      # fp32 travels as a plain tensor either way
            return plain
        if codec not in contained:
            raise ValueError(f"the deployment has no self-contained {codec} tail for {what} (it has "
                             f"{', '.join(contained) or 'none'}; split.vision.deploy self_contained=...)")
        return contained[codec]

    def run_stage(self, i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.stages[i].session.run(None, {"x": x})
        return outputs[0], (outputs[1] if self.stages[i].has_exit else None)

    def encode(self, key: str, x: np.ndarray) -> np.ndarray:
        return self.encoders[key].run(None, {"x": x})[0]

    def profile(self, repeats: int = 20) -> dict:
        """Median seconds of each stage and encoder here, batch 1 (for the planner)."""
        x = np.random.default_rng(0).random((1, *self.manifest["input"]["shape"]), dtype=np.float32)
        stage_s, outputs = [], []
        for i in range(len(self.stages)):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                y, _ = self.run_stage(i, x)
                times.append(time.perf_counter() - start)
            stage_s.append(float(np.median(times)))
            outputs.append(y)
            x = y
        encoder_s = {}
        for key, b in self.manifest["bottlenecks"].items():
            a = outputs[self.stage_index(b["stage"])]
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.encode(key, a)
                times.append(time.perf_counter() - start)
            encoder_s[key] = float(np.median(times))
        return {"stage_s": stage_s, "encoder_s": encoder_s, "activations": outputs}
