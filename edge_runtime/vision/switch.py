"""Adaptive small/big model switching (after "Adaptive Deep Learning for Efficient Visual Pose
Estimation aboard Ultra-low-power Nano-drones"): the small model answers by default; the big one
(or the cloud's copy of it) answers the frames the small one is likely to get wrong. Three
strategies decide which frames those are:

  consistency  the small model's output is temporally inconsistent with the last answer (a class
               change, a regression output that jumped more than `max_jump`) or unconfident: answer
               with the big model and stay on it for `hold` frames, the small one not run meanwhile.
  auxiliary    the small model's auxiliary output, its own predicted error on this frame (trained
               beside it), is above `aux_threshold`: escalate before the error shows in the output,
               then hold as above.
  combined     either signal escalates; the small model keeps running while the big one answers,
               and the switch returns to it only after `hold` calm frames in a row (predicted error
               below `aux_release` and consistent): hysteresis in both the threshold and time.

When both models ran on a frame, the regression answer is fused: fuse * small + (1 - fuse) * big,
per output (`fuse`, fitted on validation data; 0 keeps the big model's answer). Device state
shifts every strategy: a low battery or a hot device relaxes the triggers (no confidence trigger,
twice the jump and aux thresholds) and halves the hold; a good link sends escalations to the cloud.

    switch = AdaptiveSwitch(run_small, run_big, SwitchConfig(strategy="combined", aux=1, regression=4))
    stream = StreamState()                          # one per camera: the last answer, the hold
    answer = switch.step(frame, DeviceState(battery=0.8), stream)
    answer.output, answer.ran, answer.reason        # ran: ("small",), ("small", "big"), ("big",), ...

Outputs are 1-D arrays: class logits (any number, or none), then `regression` values, then (the
small model only) `aux` auxiliary values, the first of which is its predicted error. An answer
has the big model's layout: logits, then regression.
"""
from dataclasses import dataclass, field, fields

import numpy as np

from edge_runtime.vision.exit_policy import confidence

STRATEGIES = ("consistency", "auxiliary", "combined")


@dataclass
class DeviceState:
    battery: float = 1.0          # 0..1 charge
    temperature_c: float = 50.0
    link_quality: float = 0.0     # 0 (no link) .. 1 (good); from the offload client's recent calls


@dataclass
class SwitchConfig:
    strategy: str = "consistency"
    confidence: float = 0.9       # small's max softmax at or below this: escalate (when there are classes)
    max_jump: float = 0.06        # a regression output moved more than this since the last answer
    aux_threshold: float = 0.05   # the small model's predicted error above this: escalate
    aux_release: float | None = None  # combined: calm only below this (default aux_threshold)
    hold: int = 6                 # frames on the big model after an escalation (combined: calm frames)
    regression: int = 2           # regression outputs, after the class logits
    aux: int = 0                  # auxiliary outputs at the end of the small model's output
    fuse: float | list = 0.0      # weight of the small model's regression when both ran
    low_battery: float = 0.2      # below: frugal (relaxed triggers, half the hold)
    hot_c: float = 80.0           # above: the same
    cloud_link: float = 0.5       # link quality at or above which escalations go to the cloud

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"switch setting '{name}': {why}, got {getattr(self, name)!r}")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"expected one of {', '.join(STRATEGIES)}")
        for name in ("hold", "regression", "aux"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(name, "expected a whole number >= 0")
        for name in ("confidence", "max_jump", "aux_threshold", "low_battery", "hot_c", "cloud_link"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                bad(name, "expected a finite number")
        if self.aux_release is not None and not (isinstance(self.aux_release, (int, float))
                                                 and 0 <= self.aux_release <= self.aux_threshold):
            bad("aux_release", f"expected a number from 0 to aux_threshold ({self.aux_threshold})")
        if self.strategy != "consistency" and self.aux < 1:
            bad("aux", f"strategy '{self.strategy}' needs the small model's predicted error: aux >= 1")
        weights = np.atleast_1d(np.asarray(self.fuse, dtype=object))
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= 1 for w in weights) \
                or weights.size not in (1, max(self.regression, 1)):
            bad("fuse", f"expected a weight from 0 to 1, or one per regression output ({self.regression})")

    @classmethod
    def from_dict(cls, settings: dict) -> "SwitchConfig":
        """Settings from adaptive.json or an agent config; an unknown name is an error naming it."""
        known = {f.name for f in fields(cls)}
        if not isinstance(settings, dict):
            raise ValueError(f"switch settings must be a table of name = value, got {settings!r}")
        for name in settings:
            if name not in known:
                raise ValueError(f"switch setting '{name}' is not one of {', '.join(sorted(known))}")
        return cls(**settings)


@dataclass
class StreamState:
    """What the switch remembers about one stream of frames (one camera)."""
    previous: np.ndarray | None = None   # the last answer
    hold_left: int = 0                   # consistency / auxiliary: frames still on the big model
    escalated: bool = False              # combined: the big model answers
    calm: int = 0                        # combined: calm small-model frames in a row while escalated


@dataclass
class Answer:
    output: np.ndarray
    ran: tuple                    # which models ran on this frame, in order
    reason: str = ""
    predicted_error: float | None = None  # the small model's aux output, when it ran and has one


@dataclass
class AdaptiveSwitch:
    run_small: callable
    run_big: callable
    config: SwitchConfig = field(default_factory=SwitchConfig)
    run_cloud: callable = None
    stream: StreamState = field(default_factory=StreamState)   # the default stream's state

    # --- reading outputs ---------------------------------------------------------------------
    def _parts(self, out: np.ndarray):
        """(logits, regression) of an answer-layout output."""
        r = self.config.regression
        return (out[:-r], out[-r:]) if r else (out, out[:0])

    def _small(self, out: np.ndarray):
        """(answer-layout output, predicted error or None) of a small-model output."""
        a = self.config.aux
        return (out[:-a], float(out[-a])) if a else (out, None)

    def _frugal(self, state: DeviceState) -> bool:
        return state.battery < self.config.low_battery or state.temperature_c > self.config.hot_c

    def _slack(self, state: DeviceState) -> float:
        """How much a frugal device widens the jump and aux thresholds (one rule for every trigger)."""
        return 2.0 if self._frugal(state) else 1.0

    def inconsistent(self, out: np.ndarray, state: DeviceState, stream: StreamState | None = None) -> str:
        """Why the small model's (answer-layout) output cannot be trusted on this frame ('' when it can)."""
        stream = stream or self.stream
        logits, reg = self._parts(out)
        frugal = self._frugal(state)
        if stream.previous is not None:
            prev_logits, prev_reg = self._parts(stream.previous)
            if logits.size and logits.argmax() != prev_logits.argmax():
                return "class changed"
            if reg.size and np.abs(reg - prev_reg).max() > self.config.max_jump * self._slack(state):
                return "position jumped"
        if not frugal and logits.size and confidence(logits) <= self.config.confidence:
            return "low confidence"
        return ""

    def _unsure(self, predicted: float | None, state: DeviceState) -> str:
        if predicted is None:
            return ""
        threshold = self.config.aux_threshold * self._slack(state)
        return "predicted error" if predicted > threshold else ""

    # --- answering -----------------------------------------------------------------------------
    def _escalate(self, frame, state: DeviceState):
        """(output, what ran): the cloud when the link is good; run_cloud returning None means the
        cloud did not answer, and the big model answers here instead (ran: cloud, big)."""
        if self.run_cloud is not None and state.link_quality >= self.config.cloud_link:
            out = self.run_cloud(frame)
            if out is not None:
                return out, ("cloud",)
            return self.run_big(frame), ("cloud", "big")
        return self.run_big(frame), ("big",)

    def _fused(self, small: np.ndarray, big: np.ndarray) -> np.ndarray:
        """The big model's answer with its regression outputs moved towards the small model's by `fuse`."""
        w = np.asarray(self.config.fuse, dtype=np.float64)
        if not w.any() or not self.config.regression:
            return big
        r = self.config.regression
        out = np.array(big, dtype=np.float64, copy=True)
        out[-r:] = w * small[-r:] + (1 - w) * big[-r:]
        return out.astype(np.asarray(big).dtype, copy=False)

    def _hold(self, state: DeviceState) -> int:
        return self.config.hold // 2 if self._frugal(state) else self.config.hold

    def step(self, frame, state: DeviceState | None = None, stream: StreamState | None = None) -> Answer:
        state, stream = state or DeviceState(), stream or self.stream
        if self.config.strategy == "combined":
            return self._step_combined(frame, state, stream)
        if stream.hold_left > 0:
            stream.hold_left -= 1
            out, where = self._escalate(frame, state)
            stream.previous = out
            return Answer(out, where, "hold")
        small, predicted = self._small(self.run_small(frame))
        reason = self._unsure(predicted, state) if self.config.strategy == "auxiliary" \
            else self.inconsistent(small, state, stream)
        if not reason:
            stream.previous = small
            return Answer(small, ("small",), "", predicted)
        big, where = self._escalate(frame, state)
        out = self._fused(small, big)
        stream.hold_left = self._hold(state)
        stream.previous = out
        return Answer(out, ("small", *where), reason, predicted)

    def _step_combined(self, frame, state: DeviceState, stream: StreamState) -> Answer:
        """The small model runs on every frame; either signal escalates; while escalated, `hold` calm
        frames in a row (answered by the big model) and then the next calm one returns to the small."""
        small, predicted = self._small(self.run_small(frame))
        reason = self._unsure(predicted, state) or self.inconsistent(small, state, stream)
        if stream.escalated:
            release = self.config.aux_threshold if self.config.aux_release is None else self.config.aux_release
            calm = not reason and predicted is not None and predicted <= release * self._slack(state)
            stream.calm = stream.calm + 1 if calm else 0
            if stream.calm > self._hold(state):
                stream.escalated, stream.calm = False, 0
            else:
                reason = reason or "hold"
        elif reason:
            stream.escalated, stream.calm = True, 0
        if not stream.escalated:
            stream.previous = small
            return Answer(small, ("small",), "", predicted)
        big, where = self._escalate(frame, state)
        out = self._fused(small, big)
        stream.previous = out
        return Answer(out, ("small", *where), reason, predicted)
