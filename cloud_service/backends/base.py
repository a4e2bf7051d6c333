"""The interface every backend implements: `infer(inputs, state) -> outputs` with numpy arrays.

A stateful backend raises InvalidArgument only before it touches `state`, so such an error
leaves the session usable; any other error ends the session.
"""
from abc import ABC, abstractmethod

import numpy as np

from cloud_service.config import TensorSpec


class Backend(ABC):
    platform: str = ""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray], state: dict | None = None) -> dict[str, np.ndarray]:
        """Run the model. `state` is the session's own dict for stateful models (kept between
        requests of one sequence_id by the session store), None otherwise."""

    def close(self) -> None:
        """Release what the backend holds (sessions, threads)."""
