"""Adaptive model switching (after the nano-drone adaptive system): run the small model by
default; when its output is temporally inconsistent with the previous frame's answer, or its
confidence drops, answer this frame with the big model (or the cloud tail) and stay there for
`hold` frames (hysteresis) before trying the small model again. Device state shifts the policy:
a low battery or a hot device makes escalation rarer; a good link sends escalations to the cloud.

    switch = AdaptiveSwitch(run_small, run_big, SwitchConfig(), run_cloud=None)   # run_cloud: None = no answer
    answer = switch.step(frame, DeviceState(battery=0.8, temperature_c=55, link_quality=1.0))
    answer.output, answer.ran        # output (12,): 10 class logits + (x, y); ran: ("small",), ("small", "big"), ...

Models return a 1-D array: class logits first, then `regression` trailing values (here x, y).
"""
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.vision.exit_policy import confidence


@dataclass
class DeviceState:
    battery: float = 1.0          # 0..1 charge
    temperature_c: float = 50.0
    link_quality: float = 0.0     # 0 (no link) .. 1 (good); from the offload client's recent calls


@dataclass
class SwitchConfig:
    confidence: float = 0.9       # small's max softmax at or below this: escalate
    max_jump: float = 0.06        # (x, y) moved more than this (fraction of the frame) since the last answer
    hold: int = 6                 # frames on the big model after an escalation
    regression: int = 2           # trailing regression outputs
    low_battery: float = 0.2      # below: escalate only on a class change, and hold half as long
    hot_c: float = 80.0           # above: the same
    cloud_link: float = 0.5       # link quality at or above which escalations go to the cloud


@dataclass
class Answer:
    output: np.ndarray
    ran: tuple                    # which models ran on this frame, in order
    reason: str = ""


@dataclass
class AdaptiveSwitch:
    run_small: callable
    run_big: callable
    config: SwitchConfig = field(default_factory=SwitchConfig)
    run_cloud: callable = None
    previous: np.ndarray | None = None
    hold_left: int = 0

    def _split(self, out):
        r = self.config.regression
        return out[:-r] if r else out, out[-r:] if r else np.zeros(0)

    def inconsistent(self, out: np.ndarray, state: DeviceState) -> str:
        """Why the small model's output cannot be trusted on this frame ('' when it can)."""
        logits, xy = self._split(out)
        frugal = state.battery < self.config.low_battery or state.temperature_c > self.config.hot_c
        if self.previous is not None:
            prev_logits, prev_xy = self._split(self.previous)
            if logits.argmax() != prev_logits.argmax():
                return "class changed"
            if not frugal and xy.size and np.abs(xy - prev_xy).max() > self.config.max_jump:
                return "position jumped"
        if not frugal and confidence(logits) <= self.config.confidence:
            return "low confidence"
        return ""

    def _escalate(self, frame, state: DeviceState):
        """(output, what ran): the cloud when the link is good; run_cloud returning None means the
        cloud did not answer, and the big model answers here instead (ran: cloud, big)."""
        if self.run_cloud is not None and state.link_quality >= self.config.cloud_link:
            out = self.run_cloud(frame)
            if out is not None:
                return out, ("cloud",)
            return self.run_big(frame), ("cloud", "big")
        return self.run_big(frame), ("big",)

    def step(self, frame, state: DeviceState | None = None) -> Answer:
        state = state or DeviceState()
        if self.hold_left > 0:
            self.hold_left -= 1
            out, where = self._escalate(frame, state)
            self.previous = out
            return Answer(out, where, "hold")
        out = self.run_small(frame)
        reason = self.inconsistent(out, state)
        if not reason:
            self.previous = out
            return Answer(out, ("small",))
        big, where = self._escalate(frame, state)

        frugal = state.battery < self.config.low_battery or state.temperature_c > self.config.hot_c
        self.hold_left = self.config.hold // 2 if frugal else self.config.hold
        self.previous = big
        return Answer(big, ("small", *where), reason)
