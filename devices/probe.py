"""Measure the live machine (numpy and psutil only) and write what it measured as a device profile.

    python -m devices.probe                              # one JSON object of measurements (quick sizes)
    edge-runtime probe --out my-board.toml --peer 10.0.0.3:29500      # a profile, bundled format

What is measured, and how:
  gemm_gflops            float32 GEMM through numpy's BLAS, best of a few timed windows
  peak_gflops()          fp32 peak from /proc/cpuinfo (cores x clock x FLOP/cycle): what the
                         planner divides by, because a GEMM on a machine shared with other work
                         varies several-fold from run to run
  memory_bandwidth_gbs   best of a few copies of a large numpy array; bytes read + bytes written
                         (the STREAM "copy" convention)
  disk_read()            a file of random bytes written, fsync'ed, dropped from the page cache with
                         posix_fadvise(DONTNEED), then read back; the result says whether the figure
                         is of the disk or of memory (no fadvise, tmpfs). A virtual disk may still
                         be served from the host's cache.
  rtt_ms()               median time of TCP connects to a peer's HOST:PORT (one SYN/SYN-ACK round trip)

`profile_toml(measure(...))` is the text of a profile in the format of devices/profiles/*.toml,
each value with a comment saying it was measured (and when) or where it came from.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from devices.address import parse_address
from devices.profiles import load_profile

DEFAULT_DISK_DIR = Path(os.environ.get("EDGEFOLD_CACHE", Path.home() / ".cache" / "edgefold"))
IN_MEMORY_FS = ("tmpfs", "ramfs")


class ProbeError(OSError):
    """A measurement that could not be made (an unreachable peer, an unwritable folder)."""


def gemm_gflops(n: int = 512, seconds: float = 0.2, trials: int = 3) -> float:
    """Float32 GEMM rate of this machine (numpy's BLAS, its default threads): the best of
    `trials` windows, so a machine shared with other work reports what it can reach."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a @ b
    best = 0.0
    for _ in range(trials):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        best = max(best, 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e9)
    return best


def cpu_info() -> dict:
    """{"model", "ghz", "flags"} from /proc/cpuinfo (and cpufreq's maximum clock where the kernel has
    it). x86 BogoMIPS is 2 x the clock; ARM's is a timer rate, so it is never used for the clock there."""
    info = {"model": "", "ghz": 0.0, "flags": set()}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    info["model"] = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or ""
    info["flags"] = set((fields.get("flags") or fields.get("features") or "").split())
    try:
        info["ghz"] = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        try:
            if "cpu mhz" in fields:
                info["ghz"] = float(fields["cpu mhz"]) / 1e3
            elif "bogomips" in fields and "flags" in fields:      # x86 only
                info["ghz"] = float(fields["bogomips"]) / 2e3
        except ValueError:
            pass
    return info


def flop_per_cycle(flags: set) -> int:
    """64 with AVX-512, 32 with AVX2+FMA, 16 with AVX or ARM ASIMD, else 8 (fp32, per core)."""
    if "avx512f" in flags:
        return 64
    if {"avx2", "fma"} <= flags:
        return 32
    if "avx" in flags or "asimd" in flags:
        return 16
    return 8


def peak_gflops() -> float:
    """fp32 peak estimate: cores x GHz x flop_per_cycle; 2.0 GHz when the clock is not reported."""
    info = cpu_info()
    return (os.cpu_count() or 1) * (info["ghz"] or 2.0) * flop_per_cycle(info["flags"])


def memory_bandwidth_gbs(mib: int = 256, trials: int = 5) -> float:
    """Best copy rate of a `mib` MiB float64 array (read + write bytes, GB/s). Capped at an eighth of
    the available memory, so a small board is not pushed into swap."""
    mib = max(1, min(mib, psutil.virtual_memory().available // 2**20 // 8))
    src = np.ones(mib * 2**20 // 8)
    dst = np.full_like(src, 2.0)            # touched, so no page faults are timed
    np.copyto(dst, src)
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / max(time.perf_counter() - start, 1e-9) / 1e9)
    return best


@dataclass(frozen=True)
class DiskRead:
    mbs: float                   # MB/s (1e6 bytes) reading the file back
    mib: int                     # the file's size
    cached: bool                 # True: the figure is of the page cache, not of the disk
    how: str                     # how the cache was (or could not be) dropped


def _fstype(path: Path) -> str:
    path, best = str(path.resolve()), ("", "")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") + "/"
        if (path + "/").startswith(mount) and len(mount) > len(best[0]):
            best = (mount, part.fstype)
    return best[1]


def disk_read(directory=None, mib: int = 64) -> DiskRead:
    """Sequential read rate of a `mib` MiB file written in `directory` (default: the edgefold cache,
    where tensor-parallel shards are paged from). The file is removed afterwards."""
    directory = Path(directory or DEFAULT_DISK_DIR)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".edgefold-probe-", dir=directory)
    except OSError as err:
        raise ProbeError(f"--disk-dir {directory}: cannot write a test file there: {err}") from None
    chunk = np.random.default_rng(0).bytes(4 * 2**20)   # random: a compressing file system gains nothing
    try:
        with os.fdopen(fd, "wb") as f:
            for i in range(max(1, mib // 4)):
                f.write(chunk[i % 7:] + chunk[:i % 7])     # no two chunks alike, either
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
            fstype = _fstype(directory)
            if fstype in IN_MEMORY_FS:
                cached, how = True, f"{directory} is on {fstype}: the file lives in memory"
            elif hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    cached, how = False, "dropped from the page cache with posix_fadvise(DONTNEED), then read back"
                except OSError as err:
                    cached, how = True, f"posix_fadvise(DONTNEED) failed ({err.strerror}): read from the page cache"
            else:
                cached, how = True, "no posix_fadvise on this system: read from the page cache"
        buf = memoryview(bytearray(4 * 2**20))
        start = time.perf_counter()
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        elapsed = max(time.perf_counter() - start, 1e-9)
    finally:
        os.unlink(name)
    return DiskRead(size / elapsed / 1e6, size // 2**20, cached, how)


def parse_peer(text: str) -> tuple[str, int]:
    """"10.0.0.3:29500", "pi.local:22" or "[::1]:8001" -> (host, port); ValueError naming --peer."""
    return parse_address(text, "--peer")


def rtt_ms(peer: str, count: int = 5, timeout_s: float = 1.0) -> float:
    """Median of `count` TCP connect times to `peer` (HOST:PORT), in ms. Something must listen there
    (a tp worker's port, sshd on :22). ProbeError when it cannot be reached within timeout_s."""
    host, port = parse_peer(peer)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ProbeError(f"peer {peer}: cannot resolve {host!r}: {err.strerror}") from None
    times = []
    for _ in range(max(1, count)):
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout_s)
            start = time.perf_counter()
            try:
                s.connect(address)
            except socket.timeout:
                raise ProbeError(f"peer {peer} unreachable: no answer to a TCP connect within "
                                 f"{timeout_s:g} s") from None
            except OSError as err:
                raise ProbeError(f"peer {peer} unreachable: {err.strerror or err} "
                                 f"(is something listening on port {port}?)") from None
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(quick: bool = False, disk_dir=None, peer: str | None = None, timeout_s: float = 1.0) -> dict:
    """All measurements as one flat dict (what `edge-runtime probe --json` prints)."""
    info = cpu_info()
    rtt = rtt_ms(peer, timeout_s=timeout_s) if peer else None      # first: an unreachable peer fails fast
    disk = disk_read(disk_dir, mib=8 if quick else 64)
    gemm = gemm_gflops(256, 0.05, 2) if quick else gemm_gflops()
    return {
        "date": datetime.date.today().isoformat(), "host": socket.gethostname(), "cpu": info["model"],
        "cores": os.cpu_count(), "ghz": round(info["ghz"], 3), "flop_per_cycle": flop_per_cycle(info["flags"]),
        "peak_fp32_gflops": round(peak_gflops(), 1), "gemm_gflops": round(gemm, 2),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "memory_bandwidth_gbs": round(memory_bandwidth_gbs(64 if quick else 256, 3 if quick else 5), 2),
        "storage_read_mbs": round(disk.mbs, 1), "storage_mib": disk.mib, "storage_cached": disk.cached,
        "storage_how": disk.how,
        "storage_dir": str(Path(disk_dir or DEFAULT_DISK_DIR)), "quick": quick,
        "peer": peer, "rtt_ms": None if rtt is None else round(rtt, 3),
    }


def _line(text: str) -> str:
    return " ".join(str(text).split())        # one comment line, whatever a path or a host name holds


def profile_toml(m: dict, name: str | None = None, link_rate_mbit: float | None = None,
                 defaults_from: str = "raspberry-pi-4", power: dict | None = None) -> str:
    """A profile in the bundled format from `measure()`'s dict. Not measurable here, and said so in
    the file: power (from the profile `defaults_from`, or `power`: {"idle_w": ..., ...}, None = not given),
    the link rate, and the links themselves when no peer was probed (copied from `defaults_from`)."""
    base = load_profile(defaults_from)
    by = f"measured by `edge-runtime probe` on {m['date']}"
    fp32 = max(m["peak_fp32_gflops"], m["gemm_gflops"])
    clock = f"{m['ghz']:g} GHz" if m["ghz"] else "2 GHz assumed (clock not reported)"
    if fp32 == m["peak_fp32_gflops"]:
        source = f"fp32 peak from /proc/cpuinfo: {m['cores']} cores x {clock} x {m['flop_per_cycle']} FLOP/cycle"
    else:
        source = "the GEMM rate below, above the /proc/cpuinfo peak estimate"
    given = sorted(k for k, v in (power or {}).items() if v is not None)
    power = {k: power[k] if k in given else getattr(base, k) for k in ("idle_w", "active_w", "radio_tx_w")}
    power_note = (f"except {', '.join(given)}, given on the command line" if given
                  else "pass --idle-w, --active-w, --radio-tx-w to state yours")
    out = [f"# {_line(name or m['host'])}: {by} on host {_line(m['host'])} ({_line(m['cpu']) or 'CPU model unknown'}, "
           f"{m['cores']} logical cores){' with --quick sizes' if m['quick'] else ''}.",
           "# Each value says whether it was measured or where it comes from.",
           f"name = {json.dumps(name or m['host'])}", 'kind = "edge"', "", "[compute]",
           f"# {by}:", f"# {source}.",
           f"# A numpy float32 GEMM reached {m['gemm_gflops']:g} GFLOP/s; the planner scales costs by ratios of",
           "# peaks, as the bundled profiles state peaks.",
           f"fp32_gflops = {float(fp32)!r}",
           "# estimate, not measured: 2x fp32 (16-bit multiply-accumulate of 8-bit data, as in the Pi 4",
           "# profile; a CPU with int8 dot-product instructions reaches more).",
           f"int8_gops = {float(round(2 * fp32, 1))!r}",
           "# default, not measured: ONNX Runtime's per-call overhead is tens of microseconds on a desktop-class",
           "# core and a few tenths of a ms on a Cortex-A72 (see the bundled profiles).",
           "overhead_ms = 0.05",
           f"memory_gb = {float(m['memory_gb'])!r}   # {by}: psutil.virtual_memory().total, GiB",
           f"# {by}: best numpy copy of a large array, bytes",
           "# read + written (STREAM copy); a sustained figure, below the datasheet peaks of the bundled profiles.",
           f"memory_bandwidth_gbs = {float(m['memory_bandwidth_gbs'])!r}",
           f"# {by}: a file of {m['storage_mib']} MiB written in",
           f"# {_line(m['storage_dir'])},",
           f"# {_line(m['storage_how'])}" + (" (a memory figure, not the disk's)." if m["storage_cached"] else "."),
           f"storage_read_mbs = {float(m['storage_read_mbs'])!r}", "", "[power]",
           f"# not measured (a generic machine reports no power): from the bundled profile '{base.key}';",
           f"# {power_note}.",
           *(f"{k} = {float(power[k])!r}" for k in ("idle_w", "active_w", "radio_tx_w"))]
    if m.get("peer"):
        rate_note = ("given with --link-rate-mbit" if link_rate_mbit is not None
                     else "default, not measured: a 100 Mbit/s WiFi link; pass --link-rate-mbit")
        out += ["", "[[links]]", f'name = "peer"         # the link to {_line(m["peer"])}',
                f"rate_mbit = {float(link_rate_mbit if link_rate_mbit is not None else 100.0)!r}   # {rate_note}",
                f"rtt_ms = {float(m['rtt_ms'])!r}   # {by}: median TCP connect time to {_line(m['peer'])}"]
    else:
        for link in base.links:
            out += ["", "[[links]]", f"# not measured (no --peer): copied from the bundled profile '{base.key}'",
                    f"name = {json.dumps(link.name)}", f"rate_mbit = {link.rate_mbit!r}", f"rtt_ms = {link.rtt_ms!r}"]
    return "\n".join(out) + "\n"


def probe_profile(name: str | None = None, peer: str | None = None, link_rate_mbit: float | None = None,
                  disk_dir=None, quick: bool = False, defaults_from: str = "raspberry-pi-4",
                  power: dict | None = None) -> str:
    """Measure this machine and return its profile's TOML text (load it back with load_profile)."""
    return profile_toml(measure(quick, disk_dir, peer), name, link_rate_mbit, defaults_from, power)


if __name__ == "__main__":
    print(json.dumps(measure(quick=True)))
