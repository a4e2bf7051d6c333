"""What each candidate placement of a split deployment costs on this machine, for split.planner
(used by `edge-runtime plan`, the agent's `split` pipeline with placement "auto", and the benchmarks).

    candidates, measured = measure_candidates(Deployment.load("deploy/res_cnn/device"), repeats=20)
    plan(candidates, link, device_profile, cloud_profile, peak_gflops())

Costs measured here: each ONNX stage and bottleneck encoder (median of `repeats` runs, batch 1, one
thread), the activation's bytes after each codec and the time to encode it, and PNG encoding of
the frame for full offload. The cloud's compute for a cut is the remaining stages (plus the
encoder's time again, for the decoder). Accuracy per placement comes from the deployment's
manifest (measured on the test split by the benchmark), when present.

Exits: each exit branch at or before the cut may answer a frame on the device. The planner
takes each exit's rate (the fraction of the frames reaching it that leave there) from the
manifest's `exit_rates` (measured on validation data at its thresholds by split.vision.deploy)
and predicts the expected cost per frame, and the fraction offloaded. An exit at threshold 1.0
never answers; one with a lower threshold and no rate (an older deployment.json) is left out of
the prediction, with a note.
"""
import time

import numpy as np

from split.codec import encode
from split.placement import Placement
from split.planner import Candidate

DOWN_BYTES = 40 + 40          # (1, 10) float32 logits + the response's tensor metadata


def _codec_cost(a: np.ndarray, codec: str, repeats: int) -> tuple[int, float]:
    """Bytes on the wire after the codec, and the median seconds to encode on this machine."""
    if codec == "fp32":
        return a.nbytes, 0.0
    times = []
    for _ in range(max(3, repeats // 4)):
        start = time.perf_counter()
        enc = encode(a, codec, axis=1 if a.ndim == 4 else -1)
        times.append(time.perf_counter() - start)
    return enc.nbytes, float(np.median(times))


def exit_probabilities(manifest: dict) -> tuple[dict[str, float], list[str]]:
    """Each exit's p_exit for the planner, and notes on the exits it cannot account for."""
    measured, p_exit, missing = manifest.get("exit_rates", {}), {}, []
    for s in manifest["stages"]:
        if not s["exit"]:
            continue
        if float(manifest["thresholds"].get(s["name"], 1.0)) >= 1.0:
            p_exit[s["name"]] = 0.0                     # confidence > 1.0 never happens
        elif s["name"] in measured:
            p_exit[s["name"]] = float(measured[s["name"]])
        else:
            missing.append(s["name"])
    notes = [f"exits after {', '.join(missing)} not accounted for: deployment.json has no exit_rates for them "
             "(rebuild it with split.vision.deploy.build_deployment(..., validation=frames))"] if missing else []
    return p_exit, notes


def measure_candidates(dep, repeats: int = 20) -> tuple[list[Candidate], dict]:
    prof = dep.profile(repeats)
    stage_s, acts = prof["stage_s"], prof["activations"]
    accuracy = dep.manifest.get("accuracy", {})
    frame = np.random.default_rng(0).random((1, *dep.manifest["input"]["shape"]), dtype=np.float32)
    times = []
    for _ in range(max(3, repeats // 4)):
        start = time.perf_counter()
        enc = encode(frame, "png")
        times.append(time.perf_counter() - start)
    png_s = float(np.median(times))
    png_bytes = int(dep.manifest.get("frame_png_bytes", enc.nbytes))
    total = sum(stage_s)
    p_exit, notes = exit_probabilities(dep.manifest)

    def cand(placement, device_s, cloud_s, up, k):
        """k: the stages on the device; the exits among them may answer first."""
        exits = tuple((p_exit[s.name], sum(stage_s[:i + 1])) for i, s in enumerate(dep.stages[:k])
                      if s.has_exit and p_exit.get(s.name))
        return Candidate(placement, device_s, cloud_s, up, DOWN_BYTES if up else 0, accuracy.get(placement), exits)
    rows = [cand("local", total, 0.0, 0, len(stage_s)), cand("offload", png_s, total + png_s, png_bytes, 0)]
    for stage in dep.manifest["cuts"]:
        k = dep.stage_index(stage) + 1
        for codec in ("fp32", "int8", "int4"):
            nbytes, codec_s = _codec_cost(acts[k - 1], codec, repeats)
            rows.append(cand(f"split:{stage}:{codec}", sum(stage_s[:k]) + codec_s, sum(stage_s[k:]), nbytes, k))
    for key, b in dep.manifest["bottlenecks"].items():
        k = dep.stage_index(b["stage"]) + 1
        z = dep.encode(key, acts[k - 1])
        enc_s = prof["encoder_s"][key]
        for codec in ("int8", "int4"):
            p = str(Placement("split", b["stage"], b["channels"], codec))
            nbytes, codec_s = _codec_cost(z, codec, repeats)
            rows.append(cand(p, sum(stage_s[:k]) + enc_s + codec_s, sum(stage_s[k:]) + enc_s, nbytes, k))
    return rows, {"stage_s": stage_s, "png_s": png_s, "exit_rates": p_exit, "notes": notes}
