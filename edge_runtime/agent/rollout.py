"""Trying a pulled model version before it serves, and what a rollback leaves behind (issue 15).

    pipe = open_checked(spec, folder, ctx)       # open + one smoke inference; raises with the reason
    inputs, params = smoke_request(pipe, folder) # what that inference sends
    pending = PendingRollbacks()                 # reported with every heartbeat until one is accepted
    pending.add(Rollback("mlp", "2", digest, "smoke inference failed: ...", time.time(), "1"))

The agent (agent.py) opens a new version beside the pipeline that is serving and runs the smoke
inference on it; only then does it swap. When opening or the inference fails, the new pipeline is
closed, ModelStore.roll_back points CURRENT back at the previous version and remembers the digest
(it is not pulled again until the cloud serves another), the old pipeline keeps serving, and the
rollback goes to the cloud with the next heartbeats.

The smoke inference's inputs: `smoke.safetensors` in the version folder if it is there (one
tensor per declared input, by name; safetensors, so no pickle), else built from the pipeline's
declared inputs (Pipeline.inputs): zeros of each shape with -1 dims as 1, BYTES inputs a short
text. LLM pipelines generate one token (max_new_tokens = 1); one without a tokenizer gets
`prompt_ids` [0]. Its counters are left as they were and what it left for later requests is
forgotten (Pipeline.forget_requests: an adaptive pipeline's stream history): a smoke inference is
not a request.
"""
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.agent.pipeline import Pipeline
from edge_runtime.agent.pipeline_factory import open_pipeline
from edgefold_proto.tensors import DTYPES

SMOKE_FILE = "smoke.safetensors"
SMOKE_TEXT = b"Hello"
MAX_REASON = 512            # characters of a reason (proto/fleet.proto Rollback.reason)
MAX_PENDING = 64            # rollbacks per heartbeat


class SmokeError(RuntimeError):
    """The smoke inference of a new version failed (the message says how)."""


@dataclass(frozen=True)
class Rollback:
    """A version this device installed, could not open or run, and replaced (fleet_pb.Rollback's fields)."""
    name: str                 # the model
    version: str
    digest: str
    reason: str
    unix_time: float
    restored_version: str     # "" when no earlier version was on the device


class PendingRollbacks:
    """Rollbacks not yet acknowledged by the cloud: sent with every heartbeat until one succeeds
    (the cloud counts a resent one once), the newest MAX_PENDING kept."""

    def __init__(self):
        self._items: deque = deque(maxlen=MAX_PENDING)

    def add(self, rollback: Rollback) -> None:
        self._items.append(rollback)

    def sending(self) -> list:
        return list(self._items)

    def acknowledge(self, sent: list) -> None:
        for item in sent:
            if item in self._items:
                self._items.remove(item)


def short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."


def smoke_request(pipe: Pipeline, folder: Path) -> tuple[dict, dict]:
    """(inputs, params) of the smoke inference of `pipe`, opened from `folder`."""
    params = {"max_new_tokens": 1} if hasattr(pipe, "max_new_tokens") else {}
    path = Path(folder) / SMOKE_FILE
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return dict(load_file(str(path))), params
        except (SafetensorError, OSError, ValueError) as err:
            raise SmokeError(f"{SMOKE_FILE}: cannot be read as safetensors: {err}") from None
    inputs = {}
    for spec in pipe.inputs:
        shape = tuple(1 if d is None or d < 0 else int(d) for d in spec.shape)
        if spec.datatype == "BYTES":
            if spec.name == "prompt" and getattr(pipe, "tokenizer", "") is None:
                inputs["prompt_ids"] = np.zeros((1,), np.int64)      # an LLM without tokenizer.json
                continue
            value = np.empty(shape, dtype=object)
            value[...] = SMOKE_TEXT
            inputs[spec.name] = value
        elif spec.datatype in DTYPES:
            inputs[spec.name] = np.zeros(shape, DTYPES[spec.datatype])
        else:
            raise SmokeError(f"input '{spec.name}': datatype {spec.datatype} has no zeros to send; "
                             f"put the smoke input in {SMOKE_FILE}")
    return inputs, params


def smoke_test(pipe: Pipeline, folder: Path) -> None:
    """Run one inference through `pipe`; SmokeError saying why when it fails or answers nothing."""
    before = dict(pipe.counters)
    try:
        inputs, params = smoke_request(pipe, folder)
        outputs = pipe.infer(inputs, params)
    except SmokeError:
        raise
    except Exception as err:
        raise SmokeError(f"smoke inference failed: {type(err).__name__}: {err}") from None
    finally:
        pipe.counters.clear()
        pipe.counters.update(before)
        pipe.forget_requests()
    if not isinstance(outputs, dict) or not outputs:
        raise SmokeError("smoke inference answered no output tensors")


def open_checked(spec, folder: Path, ctx, smoke: bool = True) -> Pipeline:
    """open_pipeline, then (with `smoke`) one smoke inference; a pipeline that fails it is closed
    before the error propagates."""
    pipe = open_pipeline(spec, Path(folder), ctx)
    if smoke:
        try:
            smoke_test(pipe, Path(folder))
        except BaseException:
            try:
                pipe.close()
            except Exception:        # the smoke error is the one to report
                pass
            raise
    return pipe
