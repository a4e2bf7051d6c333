"""Per-frame decisions on the device (numpy only): when an exit branch may answer.

    policy = ExitPolicy({"stage1": 0.95, "stage2": 0.9})
    if policy.exits("stage1", exit_logits): ...

A frame exits when its max softmax probability is strictly above the exit's threshold, so 1.0
never exits and 0.0 always exits at the first branch. Thresholds come from the deployment
(calibrated on validation data by split.vision.exits.calibrate_threshold) unless overridden.
"""
import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def confidence(logits: np.ndarray) -> float:
    return float(softmax(np.asarray(logits, np.float64)).max())


class ExitPolicy:
    def __init__(self, thresholds: dict[str, float]):
        for name, t in thresholds.items():
            if not 0.0 <= float(t) <= 1.0:
                raise ValueError(f"exit threshold for '{name}' is {t}; expected 0..1")
        self.thresholds = {k: float(v) for k, v in thresholds.items()}

    def exits(self, stage: str, logits: np.ndarray) -> bool:
        return confidence(logits) > self.thresholds.get(stage, 1.0)
