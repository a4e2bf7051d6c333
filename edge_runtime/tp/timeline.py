"""A per-step timeline of one rank, off unless EDGEFOLD_TP_TIMELINE names a file (read once per rank).

    EDGEFOLD_TP_TIMELINE=/tmp/tl.jsonl edge-runtime tp generate ... --json   # rank r writes /tmp/tl.jsonl.rank{r}
    .venv/bin/python scripts/tp_timeline.py /tmp/tl.jsonl                   # where each ms of a step goes

One JSON line per step (a master forward; a worker's STEP), times in microseconds:
    t0        the step's start on CLOCK_MONOTONIC (time.perf_counter_ns / 1000: the same clock in every
              rank of a host, so two ranks' lines line up)
    idle      since the end of this rank's previous step (master: sampling and the caller; worker:
              waiting for the STEP broadcast)
    embed     master: embeddings and the STEP broadcast
    layers    the layers, allreduces included;   head   master: final norm and LM head
    allreduce time inside collective.allreduce;  wait   of it, waiting for the partials / the sum
    ar        per allreduce [enter, wait start, wait end, exit] relative to t0
Off, a rank holds no Timeline and the engine's checks are `if tl is not None`.
"""
from __future__ import annotations

import json
import os
import time

ENV = "EDGEFOLD_TP_TIMELINE"


def _us() -> float:
    return time.perf_counter_ns() / 1000


def timeline_for(collective) -> Timeline | None:
    """A Timeline wrapping `collective` when EDGEFOLD_TP_TIMELINE is set, else None."""
    path = os.environ.get(ENV)
    return Timeline(f"{path}.rank{collective.rank}", collective) if path else None


class Timeline:
    def __init__(self, path: str, collective):
        self._f = open(path, "w")
        self.rank, self._step, self._end = collective.rank, 0, None
        self._row: dict | None = None
        self._ar: list[list[float]] = []
        allreduce = collective.allreduce  # the hooks apply_tp adds look the method up per call

        def timed_allreduce(tensor, layer, kind):
            self._ar.append([_us(), 0.0, 0.0, 0.0])
            out = allreduce(tensor, layer, kind)
            self._ar[-1][3] = _us()
            return out

        collective.allreduce = timed_allreduce
        for name in ("_collect", "_recv", "_wait_shm"):  # waits for the partials (master) / the sum (worker)
            if hasattr(collective, name):
                setattr(collective, name, self._timed_wait(getattr(collective, name)))

    def _timed_wait(self, wait):
        def timed(*args, **kwargs):
            t = _us()
            try:
                return wait(*args, **kwargs)
            finally:
                if self._ar and self._ar[-1][1] == 0.0 and self._ar[-1][3] == 0.0:  # inside an allreduce
                    self._ar[-1][1:3] = t, _us()
        return timed

    def begin(self) -> None:
        t = _us()
        self._row = dict(rank=self.rank, step=self._step, t0=t, idle=0.0 if self._end is None else t - self._end)
        self._ar, self._mark = [], t

    def mark(self, what: str) -> None:
        """The time since the last begin/mark goes to `what` (embed, layers, head)."""
        t = _us()
        self._row[what] = t - self._mark
        self._mark = t

    def end(self) -> None:
        row, t0 = self._row, self._row["t0"]
        self._end = _us()
        row["total"] = self._end - t0
        row["allreduce"] = sum(b - a for a, _, _, b in self._ar)
        row["wait"] = sum(w1 - w0 for _, w0, w1, _ in self._ar)
        row["ar"] = [[round(x - t0, 1) if x else None for x in a] for a in self._ar]
        self._f.write(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}) + "\n")
        self._step += 1

    def close(self) -> None:
        self._f.close()
