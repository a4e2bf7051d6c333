"""The peer-to-peer wire format of edge_runtime/tp (wire.py): headers, malformed input, and the
error bounds of the fp16 and int8 payloads.

    .venv/bin/python -m pytest -q tests/test_tp_wire.py
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edge_runtime.tp.collective import MLP
from edge_runtime.tp.wire import HEADER, DType, Header, Msg, WireError, decode, encode, unpack

C = 48  # hidden size of the messages below (960 bytes of fp32 for (1, 5, C))


def test_header_round_trip_and_malformed_headers():
    h = Header(Msg.PARTIAL, 3, 4, MLP, 17, 9, 12345, DType.F32, (1, 5, C))
    assert unpack(h.pack()) == h and HEADER.size == 100
    good = bytearray(h.pack())
    for mutate, field in [(lambda b: b[:50], "expected 100 bytes"), (lambda b: b"XXXX" + b[4:], "magic"),
                          (lambda b: b[:4] + b"\x09" + b[5:], "version"), (lambda b: b[:5] + b"\x63" + b[6:], "type"),
                          (lambda b: b[:32] + b"\x63" + b[33:], "dtype"), (lambda b: b[:33] + b"\x09" + b[34:], "shape")]:
        with pytest.raises(WireError, match=field):
            unpack(bytes(mutate(good)))
    with pytest.raises(WireError, match="needs 960 bytes, got 4"):  # buffer length vs shape
        decode(h, [b"\x00" * 4])
    with pytest.raises(WireError, match="payload frame"):
        decode(Header(Msg.SUM, dtype=DType.Q8, shape=(2, 3)), [b"\x00" * 6])
    with pytest.raises(WireError, match="row scales"):
        decode(Header(Msg.SUM, dtype=DType.Q8, shape=(2, 3)), [b"\x00" * 6, b"\x00" * 4])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=120))
def test_garbage_never_parses_into_anything_but_wire_error(data):
    try:
        unpack(data)
    except WireError:
        pass


def test_payload_error_bounds():
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 300.0):
        x = (rng.standard_normal((4, 7, 33)) * scale).astype(np.float32)
        x[0, 0] = 0.0  # an all-zero row
        h16 = decode(Header(Msg.SUM, dtype=DType.F16, shape=x.shape), encode(x, DType.F16))
        assert np.all(np.abs(h16 - x) <= np.abs(x) * 2.0 ** -11 + 1e-7)
        q8 = decode(Header(Msg.SUM, dtype=DType.Q8, shape=x.shape), encode(x, DType.Q8))
        assert np.all(np.abs(q8 - x) <= np.abs(x).max(axis=-1, keepdims=True) / 254 * 1.001 + 1e-12)
        assert np.all(q8[0, 0] == 0)
    with pytest.raises(WireError, match="fp16 payload overflows"):
        encode(np.array([1e6], np.float32), DType.F16)
