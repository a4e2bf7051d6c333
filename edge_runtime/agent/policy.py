"""The agent's offload policy: device state (battery, temperature, link quality) -> where work goes.

    state = device_state(read_telemetry().as_dict(), link_quality(rtt_ms=42.0, reachable=True))
    decision = decide(state, PolicyConfig())
    decision.allow_cloud, decision.objective, decision.reason

Rules, in order:
- the link is down or poor (quality < min_link_quality): keep every frame/token on the device, so
  no request waits for a deadline that will not be met;
- the battery is low (on battery, below low_battery) or the device is hot (above hot_c): plan for
  energy instead of latency (the planner's energy objective: offloading trades compute power for
  radio power, so a good link moves more work to the cloud);
- otherwise plan for latency.
"""
from dataclasses import dataclass, field

from edge_runtime.agent.config import PolicyConfig
from edge_runtime.vision.switch import DeviceState

GOOD_RTT_MS = 50.0        # at or below: link quality 1.0; above it falls as GOOD_RTT_MS / rtt


@dataclass(frozen=True)
class Decision:
    allow_cloud: bool
    objective: str               # latency | energy
    reason: str
    state: DeviceState = field(default_factory=DeviceState)    # what it was decided from


def link_quality(rtt_ms: float | None, reachable: bool) -> float:
    """0 when the cloud did not answer; else 1.0 up to GOOD_RTT_MS of RTT, falling as 1/RTT above."""
    if not reachable:
        return 0.0
    if rtt_ms is None:
        return 1.0
    return min(1.0, GOOD_RTT_MS / max(rtt_ms, 1e-3))


def device_state(telemetry: dict, quality: float) -> DeviceState:
    """Telemetry (devices.telemetry names) -> DeviceState. No battery or plugged in: full; no
    temperature sensor: 50 C (assumed fine)."""
    battery = telemetry.get("battery_percent")
    plugged = telemetry.get("power_plugged")
    charge = 1.0 if battery is None or plugged in (True, 1, 1.0) else float(battery) / 100.0
    return DeviceState(battery=charge, temperature_c=float(telemetry.get("temperature_c", 50.0)),
                       link_quality=quality)


def decide(state: DeviceState, policy: PolicyConfig) -> Decision:
    if state.link_quality < policy.min_link_quality:
        return Decision(False, "latency", f"link quality {state.link_quality:.2f} < {policy.min_link_quality}", state)
    if state.battery < policy.low_battery:
        return Decision(True, "energy", f"battery {state.battery:.0%} < {policy.low_battery:.0%}", state)
    if state.temperature_c > policy.hot_c:
        return Decision(True, "energy", f"temperature {state.temperature_c:.0f} C > {policy.hot_c:.0f} C", state)
    return Decision(True, "latency", "normal", state)
