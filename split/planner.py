"""The split planner (Neurosurgeon-style): predict each placement's latency and energy on a
device profile and a link from costs measured on this machine, and pick the best one that
meets an accuracy floor. Pure Python (the device runs it; no torch, no numpy).

    table = plan(candidates, device=load_profile("raspberry-pi-4"), link=parse_link("10mbit,40ms"))
    print(format_table(table)); table.choice

Scaling model, per candidate:
  device_s = measured_device_s * host_gflops / device_gflops + device.overhead_ms   (a profile)
           = measured_device_s                                                     (this machine)
  cloud_s  = measured_cloud_s the same way with the cloud profile
  network_s = rtt + (up_bytes + down_bytes + RPC_FRAMING_BYTES) * 8 / rate + rpc_overhead_s
  energy_j (device side) = active_w * device_s + radio_tx_w * upload_s + idle_w * (waiting for the cloud)
`precision` picks the device's fp32 or int8 rate (a GAP8 runs int8 models only, in practice).

Exits: a candidate lists the exit branches its frames pass on the device, in order, as
(p_exit, device_s): the fraction of frames reaching that exit that leave there (measured on
validation data at the deployment's thresholds) and the device time up to it. A frame that
leaves pays that device time only (no network, no cloud); a frame that reaches the cut pays the
whole row above. Every figure is the expectation over frames; `offload` is the fraction of frames
sent to the cloud. With no exits (or p_exit = 0: threshold 1.0) this is the row above, exactly.

Adaptive pairs: a local candidate may list the models an adaptive switch runs instead, as
(share, device_s): the fraction of frames each runs on (measured on validation data at the
switch's settings; the small model on every frame, or fewer under a hold, the big one on the
escalated share) and its time per frame here. Its device time is the sum of share x the model's
time on the profile, each run paying the profile's overhead: the big model's share, not the
worst case, sets the expected latency and energy per frame.
"""
from dataclasses import dataclass, field

RPC_FRAMING_BYTES = 300          # gRPC + HTTP/2 headers and the OIP request/response framing, both ways


@dataclass(frozen=True)
class Candidate:
    placement: str               # a split.placement string
    device_s: float              # device compute measured on this machine (s per frame)
    cloud_s: float = 0.0         # cloud compute measured on this machine
    up_bytes: int = 0            # bytes sent per frame (0: local)
    down_bytes: int = 0          # bytes received per frame
    accuracy: float | None = None
    exits: tuple[tuple[float, float], ...] = ()   # (p_exit, device_s up to the exit), in stage order
    models: tuple[tuple[float, float], ...] = ()  # adaptive pair: (share of frames, device_s) per model


@dataclass
class Prediction:
    candidate: Candidate
    device_s: float
    network_s: float
    cloud_s: float
    energy_j: float
    feasible: bool
    offload: float = 0.0         # fraction of frames sent to the cloud

    @property
    def total_s(self) -> float:
        return self.device_s + self.network_s + self.cloud_s


@dataclass
class Plan:
    rows: list[Prediction]
    choice: Prediction | None
    objective: str
    notes: list[str] = field(default_factory=list)


def _rate(profile, precision: str) -> float:
    return profile.int8_gops if precision == "int8" else profile.fp32_gflops


def scale(seconds: float, host_gflops: float, profile=None, precision: str = "fp32") -> float:
    if profile is None or seconds == 0:
        return seconds
    return seconds * host_gflops / _rate(profile, precision) + profile.overhead_ms / 1e3


def predict(c: Candidate, link, device=None, cloud=None, host_gflops: float = 1.0, precision: str = "fp32",
            rpc_overhead_s: float = 0.0005) -> Prediction:
    device_s = scale(c.device_s, host_gflops, device, precision)
    if c.models:  # an adaptive pair: each model's expected share of the frames
        device_s = sum(share * scale(s, host_gflops, device, precision) for share, s in c.models)
    cloud_s = scale(c.cloud_s, host_gflops, cloud, "fp32")
    network_s = upload_s = 0.0
    if c.up_bytes:
        upload_s = (c.up_bytes + RPC_FRAMING_BYTES / 2) * 8 / (link.rate_mbit * 1e6)
        download_s = (c.down_bytes + RPC_FRAMING_BYTES / 2) * 8 / (link.rate_mbit * 1e6)
        network_s = link.rtt_ms / 1e3 + upload_s + download_s + rpc_overhead_s
    active_w, tx_w, idle_w = (device.active_w, device.radio_tx_w, device.idle_w) if device else (0.0, 0.0, 0.0)
    # frames that leave at an exit: device time up to it, nothing else
    reach, exit_s, exit_j = 1.0, 0.0, 0.0
    for p_exit, until_s in c.exits:
        t = scale(until_s, host_gflops, device, precision)
        exit_s += reach * p_exit * t
        exit_j += reach * p_exit * active_w * t
        reach *= 1.0 - p_exit
    # frames that reach the cut: all of it
    energy = active_w * device_s + tx_w * upload_s + idle_w * (network_s - upload_s + cloud_s)
    return Prediction(c, exit_s + reach * device_s, reach * network_s, reach * cloud_s, exit_j + reach * energy,
                      True, reach if c.up_bytes else 0.0)


def plan(candidates: list[Candidate], link, device=None, cloud=None, host_gflops: float = 1.0,
         objective: str = "latency", accuracy_floor: float | None = None, precision: str = "fp32",
         rpc_overhead_s: float = 0.0005) -> Plan:
    if objective not in ("latency", "energy"):
        raise ValueError(f"objective '{objective}': expected latency or energy")
    if objective == "energy" and device is None:
        raise ValueError("objective 'energy' needs a device profile (its power figures)")
    rows = [predict(c, link, device, cloud, host_gflops, precision, rpc_overhead_s) for c in candidates]
    notes = []
    for row in rows:
        acc = row.candidate.accuracy
        if accuracy_floor is not None and acc is not None and acc < accuracy_floor:
            row.feasible = False
        if device is not None and device.kind != "edge":
            notes.append(f"device profile '{device.key}' is a {device.kind} node")
    if any(p_exit for c in candidates for p_exit, _ in c.exits):
        notes.append("expected cost per frame: a frame that leaves at an exit pays its device time only")
    key = (lambda r: r.total_s) if objective == "latency" else (lambda r: r.energy_j)
    feasible = [r for r in rows if r.feasible]
    if not feasible:
        notes.append(f"no placement meets the accuracy floor {accuracy_floor}")
    return Plan(rows, min(feasible, key=key) if feasible else None, objective, sorted(set(notes)))


def format_table(p: Plan) -> str:
    header = f"{'placement':<26}{'device ms':>10}{'network ms':>11}{'cloud ms':>9}{'total ms':>9}" \
             f"{'energy mJ':>10}{'up bytes':>9}{'offload':>8}{'accuracy':>9}  "
    lines = [header]
    for r in p.rows:
        acc = "?" if r.candidate.accuracy is None else f"{r.candidate.accuracy:.4f}"
        mark = "<- chosen" if r is p.choice else ("below floor" if not r.feasible else "")
        lines.append(f"{r.candidate.placement:<26}{r.device_s * 1e3:>10.2f}{r.network_s * 1e3:>11.2f}"
                     f"{r.cloud_s * 1e3:>9.2f}{r.total_s * 1e3:>9.2f}{r.energy_j * 1e3:>10.2f}"
                     f"{r.candidate.up_bytes:>9}{r.offload:>8.2f}{acc:>9}  {mark}")
    lines += [f"note: {n}" for n in p.notes]
    choice = p.choice.candidate.placement if p.choice else "none"
    lines.append(f"choice ({p.objective}): {choice}")
    return "\n".join(lines)
