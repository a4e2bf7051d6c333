"""The sliding-window weight pager (edge_runtime/tp/pager.py): contents, window bound, prefetch,
error paths, and peak RSS of a real worker process with a small window against everything resident."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devices.page_cache import drop_page_cache
from edge_runtime.tp import pager as pager_mod
from edge_runtime.tp.pager import Pager, PagerError, block_path, read_block

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 6
ORDER = [(i, kind) for i in range(LAYERS) for kind in ("attn", "mlp")]


def make_blocks(folder: Path, layers: int = LAYERS, hidden: int = 192, inter: int = 512, seed: int = 0):
    """Attention block ~0.6 MB, MLP block ~1.2 MB per layer, as `edge-runtime tp prepare` names them."""
    g = torch.Generator().manual_seed(seed)
    saved = {}
    for i in range(layers):
        attn = {"input_layernorm.weight": torch.randn(hidden, generator=g)}
        for p in "qkvo":
            attn[f"self_attn.{p}_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        mlp = {"post_attention_layernorm.weight": torch.randn(hidden, generator=g),
               "mlp.gate_proj.weight": torch.randn(inter, hidden, generator=g),
               "mlp.up_proj.weight": torch.randn(inter, hidden, generator=g),
               "mlp.down_proj.weight": torch.randn(hidden, inter, generator=g)}
        for kind, tensors in (("attn", attn), ("mlp", mlp)):
            save_file(tensors, str(block_path(folder, (i, kind))))
            saved[(i, kind)] = tensors
    return saved


@pytest.fixture
def blocks(tmp_path):
    return tmp_path, make_blocks(tmp_path)


def assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("window", [1, 2, 3, 0, len(ORDER), 100])
def test_walk_cycle_contents_and_window(blocks, window):
    folder, saved = blocks
    n, passes = len(ORDER), 3
    effective = n if window == 0 else min(window, n)
    with Pager(folder, ORDER, window, timeout_s=30) as pager:
        for _ in range(passes):
            for b in ORDER:
                w = pager.acquire(b)
                assert_same(w, saved[b])
                del w
                pager.release(b)
        pager.wait_idle(10)
        st = pager.stats
        assert pager.keep_all == (effective == n)
    assert 1 <= st.max_resident <= effective
    assert st.hits + st.misses == passes * n and st.still_referenced == 0
    if effective == n:
        assert st.loads == n and st.max_resident == n  # loaded once, kept
    else:
        assert passes * n <= st.loads <= passes * n + effective  # + prefetch into the next pass
    data = {b: os.path.getsize(block_path(folder, b)) - 8 - _header_len(block_path(folder, b)) for b in ORDER}
    assert st.bytes_loaded == sum(data[e[1]] for e in pager.events if e[0] == "loaded")
    if window == 2:
        assert st.reused_buffers > 0  # blocks two apart have the same size: buffers are recycled


def _header_len(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def test_prefetch_happens_before_acquire(blocks):
    folder, saved = blocks
    with Pager(folder, ORDER, 2) as pager:
        assert pager.wait_idle(10)
        # Before any acquire, the first two blocks of the cycle are loaded and the loader stops there.
        assert [e for e in pager.events if e[0] == "loaded"] == [("loaded", ORDER[0]), ("loaded", ORDER[1])]
        n = len(ORDER)
        for k in range(2 * n):
            b, after = ORDER[k % n], ORDER[(k + 2) % n]
            pager.acquire(b)
            pager.release(b)
            assert pager.wait_idle(10)
            # Releasing block k frees it and the loader reads block k+2 at once, while block k+1
            # (already loaded) is still to be acquired: loading runs ahead of the consumer.
            ev = pager.events
            assert ev[-4:] == [("release", b), ("free", b), ("load", after), ("loaded", after)]
            assert pager.stats.max_resident <= 2
        st = pager.stats
        assert st.misses == 0 and st.hits == 2 * len(ORDER)  # every acquire found its block already loaded


def test_seek_when_the_consumer_skips_blocks(blocks):
    folder, saved = blocks
    with Pager(folder, ORDER, 3) as pager:
        assert_same(pager.acquire(ORDER[0]), saved[ORDER[0]])
        pager.release(ORDER[0])
        for b in ORDER[7:] + ORDER[:3]:  # an aborted pass: jump ahead, then wrap around
            assert_same(pager.acquire(b), saved[b])
            pager.release(b)
        assert ("seek", ORDER[7]) in pager.events
        assert pager.stats.max_resident <= 3


def test_window_too_small_is_an_error_not_a_hang(blocks):
    folder, _ = blocks
    with Pager(folder, ORDER, 1, timeout_s=30) as pager:
        pager.acquire(ORDER[0])
        with pytest.raises(PagerError, match="window 1 too small"):
            pager.acquire(ORDER[1])
        pager.release(ORDER[0])
        pager.acquire(ORDER[1])
        with pytest.raises(PagerError, match="not acquired"):
            pager.release(ORDER[0])
        with pytest.raises(PagerError, match="not in this pager's order"):
            pager.acquire((99, "attn"))


def test_released_tensors_still_held_are_not_overwritten(blocks):
    folder, saved = blocks
    with Pager(folder, ORDER, 2) as pager:
        kept = pager.acquire(ORDER[0])
        pager.release(ORDER[0])  # the caller (wrongly) keeps the tensors: they must stay intact
        for _ in range(2):
            for b in ORDER[1:] + ORDER[:1]:
                w = pager.acquire(b)
                del w
                pager.release(b)
        assert_same(kept, saved[ORDER[0]])
        assert pager.stats.still_referenced == 1


def test_dtype_conversion(tmp_path):
    """Float weights and biases become the pager's dtype; quantization scales keep theirs; every
    tensor starts 64-byte aligned in the block's buffer (the int8 kernel needs it)."""
    want = {"x.weight": torch.randn(5, 3).half(), "x.bias": torch.randn(4).bfloat16(), "ids": torch.arange(6),
            "flag": torch.tensor([True, False]), "empty": torch.empty(0, 3), "x.scales": torch.randn(3).bfloat16(),
            "odd": torch.arange(7, dtype=torch.int8)}
    order = [(0, "attn"), (0, "mlp")]
    for b in order:
        save_file(want, str(block_path(tmp_path, b)))
    with Pager(tmp_path, order, 1) as pager:
        got = pager.acquire(order[0])
        assert got["x.weight"].dtype == got["x.bias"].dtype == torch.float32 and got["ids"].dtype == torch.int64
        assert torch.equal(got["x.weight"], want["x.weight"].float())
        assert torch.equal(got["x.bias"], want["x.bias"].float())
        assert got["x.scales"].dtype == torch.bfloat16 and torch.equal(got["x.scales"], want["x.scales"])
        assert all(t.data_ptr() % 64 == 0 for k, t in got.items() if t.numel() and t.dtype != torch.float32)
        assert torch.equal(got["ids"], want["ids"]) and torch.equal(got["flag"], want["flag"])
        assert got["empty"].shape == (0, 3)
    with Pager(tmp_path, order, 0, dtype=None) as pager:
        assert_same(pager.acquire(order[1]), want)


def test_missing_file(blocks):
    folder, saved = blocks
    path = block_path(folder, ORDER[3])
    path.rename(path.with_suffix(".bak"))
    with pytest.raises(FileNotFoundError, match="layer001.mlp.safetensors"):
        Pager(folder, ORDER, 2)
    path.with_suffix(".bak").rename(path)
    with Pager(folder, ORDER, 2, timeout_s=30) as pager:
        path.rename(path.with_suffix(".bak"))  # disappears after start: the error reaches acquire()
        for b in ORDER[:3]:
            pager.acquire(b)
            pager.release(b)
        with pytest.raises(PagerError, match=r"cannot load block \(1, 'mlp'\).*layer001\.mlp\.safetensors"):
            pager.acquire(ORDER[3])
        path.with_suffix(".bak").rename(path)  # back: a later acquire tries again
        assert_same(pager.acquire(ORDER[3]), saved[ORDER[3]])


def _corrupt(path: Path, how: str):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if how == "short":
        data = data[:5]
    elif how == "length":
        data = (len(data) * 2).to_bytes(8, "little") + data[8:]
    elif how == "json":
        data = data[:8] + b"{" * n + data[8 + n:]
    elif how == "offsets":
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        h = json.dumps(header).encode()
        data = len(h).to_bytes(8, "little") + h + data[8 + n:]
    elif how == "dtype":
        data = data.replace(b'"F32"', b'"X32"', 1)
    elif how == "truncated":
        data = data[:-100]
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["short", "length", "json", "offsets", "dtype", "truncated"])
def test_corrupt_file(blocks, how):
    folder, _ = blocks
    path = block_path(folder, ORDER[1])
    _corrupt(path, how)
    with pytest.raises(PagerError, match="corrupt safetensors file"):
        read_block(path)
    with Pager(folder, ORDER, 2, timeout_s=30) as pager:
        pager.acquire(ORDER[0])
        pager.release(ORDER[0])
        with pytest.raises(PagerError, match=r"layer000\.mlp\.safetensors.*corrupt"):
            pager.acquire(ORDER[1])
        pager.acquire(ORDER[2])  # the pager goes on with the next blocks


def test_timeout_names_the_file_and_close_stops_the_thread(blocks):
    folder, _ = blocks
    stuck = block_path(folder, ORDER[2])
    pager = Pager(folder, ORDER, 2, timeout_s=30)
    assert pager.wait_idle(10)
    stuck.unlink()
    os.mkfifo(stuck)  # opening it blocks until a writer comes: a hung disk
    pager.acquire(ORDER[0])
    pager.release(ORDER[0])  # the loader starts on block 2 and hangs
    pager.acquire(ORDER[1])
    pager.release(ORDER[1])
    with pytest.raises(TimeoutError, match=r"block \(1, 'attn'\) not loaded within 0\.3 s: .*layer001\.attn"):
        pager.acquire(ORDER[2], timeout_s=0.3)
    writer = threading.Thread(target=lambda: open(stuck, "wb").close())  # unblock: EOF
    writer.start()
    writer.join(10)
    with pytest.raises(PagerError, match=r"layer001\.attn\.safetensors: corrupt"):
        pager.acquire(ORDER[2])
    assert pager._thread.is_alive()
    pager.close()
    assert not pager._thread.is_alive()
    with pytest.raises(PagerError, match="closed"):
        pager.acquire(ORDER[0])
    pager.release(ORDER[0])  # a no-op after close
    pager.close()  # twice is fine


def test_loader_bug_is_not_a_silent_dead_thread(blocks, monkeypatch):
    folder, _ = blocks

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated bug")  # not an Exception: escapes the per-load handler

    monkeypatch.setattr(pager_mod, "read_block", boom)
    with Pager(folder, ORDER, 2, timeout_s=30) as pager:
        with pytest.raises(PagerError, match="loader thread died.*simulated bug"):
            pager.acquire(ORDER[0])


def _page_cache_fraction(path) -> float | None:
    """Share of the file's pages in the page cache, by mincore(2) on a fresh read-only mapping."""
    libc = ctypes.CDLL(None)
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(mm)  # ACCESS_COPY: writable, so ctypes can take its address
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
        del anchor
    return None if rc != 0 else sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise/mincore are Linux")
def test_drop_page_cache(blocks):
    folder, _ = blocks
    paths = [block_path(folder, b) for b in ORDER]
    for p in paths:
        p.read_bytes()
    before = [_page_cache_fraction(p) for p in paths]
    if None in before or min(before) < 0.9:
        pytest.skip(f"this file system does not keep these files in the page cache: {before}")
    assert drop_page_cache(paths) == sum(os.path.getsize(p) for p in paths)
    after = [_page_cache_fraction(p) for p in paths]
    assert max(after) < 0.5, after
    with Pager(folder, ORDER, 2) as pager:  # and the pager reads them back from disk fine
        pager.acquire(ORDER[0])


WALKER = r"""
import gc, json, sys, psutil, torch
from edge_runtime.tp.pager import Pager
folder, window, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
order = [(i, k) for i in range(n) for k in ("attn", "mlp")]
proc = psutil.Process()
torch.ones(8).sum()  # warm up torch before the baseline
gc.collect()
base, base_uss = proc.memory_info().rss, proc.memory_full_info().uss
peak = peak_uss = 0
with Pager(folder, order, window) as pager:
    for _ in range(2):
        for b in order:
            w = pager.acquire(b)
            float(sum(t.sum() for t in w.values()))  # touch every byte
            del w
            peak = max(peak, proc.memory_info().rss)
            if b[0] % 3 == 0:  # smaps is slow to read
                peak_uss = max(peak_uss, proc.memory_full_info().uss)
            pager.release(b)
    st = pager.stats
print(json.dumps({"window": window, "baseline_rss": base, "peak_rss_above": peak - base,
                  "peak_uss_above": peak_uss - base_uss, "max_resident": st.max_resident,
                  "hidden_fraction": st.hidden_fraction, "bytes_per_pass": st.bytes_loaded}))
"""


def test_peak_rss_small_window_below_all_resident(tmp_path):
    """A real worker process walking 24 blocks of ~4 MB: window 2 against everything resident."""
    layers = 12
    for i in range(layers):
        for j, kind in enumerate(("attn", "mlp")):
            save_file({"w": torch.full((1024, 1024), 2.0 * i + j)}, str(block_path(tmp_path, (i, kind))))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {window: subprocess.Popen([sys.executable, "-c", WALKER, str(tmp_path), str(window), str(layers)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for window in (2, 0)}  # separate processes, run side by side
    rows = {}
    for window, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        rows[window] = json.loads(out.strip().splitlines()[-1])
    small, full = rows[2], rows[0]
    ratio = small["peak_rss_above"] / full["peak_rss_above"]
    print(f"\npeak RSS above baseline: window 2 {small['peak_rss_above'] / 2**20:.1f} MiB, all resident "
          f"{full['peak_rss_above'] / 2**20:.1f} MiB, ratio {ratio:.3f} (baseline {small['baseline_rss'] / 2**20:.0f} MiB);"
          f" USS above: {small['peak_uss_above'] / 2**20:.1f} vs {full['peak_uss_above'] / 2**20:.1f} MiB")
    assert small["max_resident"] <= 2 and full["max_resident"] == 2 * layers
    assert full["peak_rss_above"] >= 0.9 * 2 * layers * 4 * 2**20  # everything really was resident
    assert small["peak_rss_above"] < full["peak_rss_above"]


def test_a_process_that_exits_without_close_exits_cleanly(tmp_path):
    """The loader thread is closed at exit: frozen mid-read in interpreter teardown, it made torch
    abort the process ("terminate called without an active exception", exit status 134)."""
    make_blocks(tmp_path, layers=12, hidden=384, inter=1024)
    code = ("import sys; from pathlib import Path; from edge_runtime.tp.pager import Pager; "
            f"p = Pager(Path({str(tmp_path)!r}), [(i, k) for i in range(12) for k in ('attn', 'mlp')], 0)")
    for _ in range(5):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-500:]
