"""The cloud context manager: per-sequence state with an idle TTL and a memory budget.

A stateful model's requests carry `sequence_id`; the first one of a sequence also carries
`sequence_start`, the last `sequence_end`. State lives here between requests. When the
budget is exceeded the least-recently-used sessions are evicted; idle ones expire. A
request for a session that is not here gets FAILED_PRECONDITION with the reason, and the
client is expected to resend its context with `sequence_start`.

What a session holds is counted from its state's buffers (state_nbytes): for the LLM backends
the KV cache's allocated tensors (capacity, not only the positions in use), after each request.
The store lives on the event loop. Evicting only drops the store's reference: a request already
queued or running on an evicted session (llm_continuation packs many into one forward on its own
thread) finishes on that state, its update() is a no-op, and its device learns at its next
request. So memory may pass the budget by what the forwards in flight add, until their requests
are accounted.
"""
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from edgefold_proto.serving import FailedPrecondition, InvalidArgument

_FORGOTTEN_KEPT = 4096  # how many evicted ids we remember, to say why a session is gone


def state_nbytes(state: dict) -> int:
    """Bytes held by a session's state: arrays and tensors count their buffers."""
    total = 0
    for value in state.values():
        if hasattr(value, "nbytes"):
            total += int(value.nbytes)
        elif hasattr(value, "element_size"):  # torch.Tensor
            total += value.element_size() * value.nelement()
        elif isinstance(value, (bytes, bytearray)):
            total += len(value)
        elif isinstance(value, (list, tuple)):
            total += state_nbytes(dict(enumerate(value)))
        elif isinstance(value, dict):
            total += state_nbytes(value)
    return total


@dataclass
class Session:
    sequence_id: int | str
    state: dict = field(default_factory=dict)
    nbytes: int = 0
    last_used: float = 0.0


class SessionStore:
    def __init__(self, ttl_s: float, max_bytes: int, clock=time.monotonic):
        self.ttl_s, self.max_bytes, self._clock = ttl_s, max_bytes, clock
        self._sessions: OrderedDict = OrderedDict()  # least recently used first
        self._forgotten: OrderedDict = OrderedDict()  # id -> why it is gone
        self.total_bytes = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def begin(self, sequence_id) -> Session:
        """A new session (a restarted one replaces the old state)."""
        self._drop(sequence_id, None)
        self._forgotten.pop(sequence_id, None)
        session = Session(sequence_id, last_used=self._clock())
        self._sessions[sequence_id] = session
        return session

    def get(self, sequence_id) -> Session:
        self.expire_idle()
        session = self._sessions.get(sequence_id)
        if session is None:
            reason = self._forgotten.get(sequence_id, "is unknown (never started, or ended)")
            raise FailedPrecondition(
                f"sequence {sequence_id!r} {reason}; resend its context with sequence_start=true")
        session.last_used = self._clock()
        self._sessions.move_to_end(sequence_id)
        return session

    def update(self, session: Session) -> None:
        """Account for the state a request left behind, then evict to stay within budget."""
        if self._sessions.get(session.sequence_id) is not session:
            return  # ended or replaced while the request ran
        new_bytes = state_nbytes(session.state)
        self.total_bytes += new_bytes - session.nbytes
        session.nbytes = new_bytes
        while self.total_bytes > self.max_bytes and self._sessions:
            oldest = next(iter(self._sessions))
            self._drop(oldest, f"was evicted to keep session memory within {self.max_bytes} bytes")
            self.evicted += 1

    def end(self, sequence_id) -> None:
        self._drop(sequence_id, None)

    def expire_idle(self) -> int:
        """Drop sessions idle for longer than the TTL; returns how many."""
        now, count = self._clock(), 0
        while self._sessions:
            oldest_id, oldest = next(iter(self._sessions.items()))
            if now - oldest.last_used <= self.ttl_s:
                break
            self._drop(oldest_id, f"expired after {self.ttl_s:g} s idle")
            count += 1
        self.expired += count
        return count

    def _drop(self, sequence_id, reason) -> None:
        session = self._sessions.pop(sequence_id, None)
        if session is not None:
            self.total_bytes -= session.nbytes
        if reason is not None:
            self._forgotten[sequence_id] = reason
            while len(self._forgotten) > _FORGOTTEN_KEPT:
                self._forgotten.popitem(last=False)


@dataclass(frozen=True)
class SequenceParams:
    sequence_id: int | str | None
    start: bool
    end: bool


def sequence_params(parameters) -> SequenceParams:
    """Read sequence_id / sequence_start / sequence_end from a request's parameters map."""
    sid = None
    if "sequence_id" in parameters:
        param = parameters["sequence_id"]
        kind = param.WhichOneof("parameter_choice")
        if kind in ("int64_param", "uint64_param"):
            sid = getattr(param, kind)
        elif kind == "string_param":
            sid = param.string_param
        else:
            raise InvalidArgument(f"parameter 'sequence_id' must be an integer or a string, got {kind}")
        if sid in (0, ""):
            sid = None  # 0 / "" mean "no sequence", as in Triton
    flags = []
    for key in ("sequence_start", "sequence_end"):
        param = parameters.get(key)
        kind = param.WhichOneof("parameter_choice") if param is not None else None
        if kind not in (None, "bool_param"):
            raise InvalidArgument(f"parameter '{key}' must be a bool, got {kind}")
        flags.append(bool(param.bool_param) if param is not None else False)
    return SequenceParams(sid, *flags)
