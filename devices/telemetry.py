"""Live telemetry of this device through psutil: load, free memory, heat and battery.

    python -m devices.telemetry        # {"cpu_percent": 0.0, "load_1m": 0.07, "memory_available_mb": ...}

    from devices.telemetry import read_telemetry
    t = read_telemetry()
    t.cpu_percent, t.temperature_c, t.as_dict()   # {"cpu_percent": 12.5, "load_1m": 0.4, ...}

Nothing here blocks or raises on a machine without sensors: a psutil without
`sensors_temperatures` / `sensors_battery` (macOS and Windows lack the first, desktops have no
battery), one that returns an empty dict or None, or one that raises, gives None for those fields.

`cpu_percent` is the system-wide CPU use since the previous reading in this process, measured
without waiting (psutil's interval=None). psutil answers 0.0 to the very first such call, having
nothing to compare with, so importing this module takes that first reading; a reading taken right
after import covers only the short time since then. Read it periodically (an agent's heartbeat)
for a meaningful figure; `load_1m` is the 1-minute load average, steady from the start.

    from devices.telemetry import ResidentSet
    rss = ResidentSet()            # starts a new high-water mark; rss.baseline is the RSS now
    ...                            # load weights, generate
    rss.peak()                     # the most this process held since, >= rss.baseline
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import psutil

psutil.cpu_percent(interval=None)   # primes the counter: the next call reports use since now


@dataclass(frozen=True)
class Telemetry:
    cpu_percent: float                 # since the previous reading (see the module docstring)
    load_1m: float                     # 1-minute load average (runnable processes)
    memory_available_mb: float         # MiB that can be given to processes without swapping
    temperature_c: float | None        # hottest sensor, None without sensors
    battery_percent: float | None      # None without a battery
    power_plugged: bool | None         # None when unknown or without a battery

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _temperature_c() -> float | None:
    """The hottest reading of any temperature sensor psutil knows (what throttles first)."""
    read = getattr(psutil, "sensors_temperatures", None)
    try:
        sensors = read() if read else None
        values = [t.current for group in (sensors or {}).values() for t in group
                  if isinstance(t.current, (int, float)) and math.isfinite(t.current) and -40 < t.current < 200]
    except Exception:                  # psutil raises OSError/RuntimeError/... on odd sensor drivers
        return None
    return float(max(values)) if values else None


def _battery() -> tuple[float | None, bool | None]:
    read = getattr(psutil, "sensors_battery", None)
    try:
        battery = read() if read else None
        if battery is None:
            return None, None
        percent = float(battery.percent) if battery.percent is not None else None
        plugged = bool(battery.power_plugged) if battery.power_plugged is not None else None
    except Exception:                  # as above: a broken sensor is no reading, not a crash
        return None, None
    return percent, plugged


def read_telemetry() -> Telemetry:
    battery_percent, power_plugged = _battery()
    return Telemetry(cpu_percent=float(psutil.cpu_percent(interval=None)),
                     load_1m=float(psutil.getloadavg()[0]),
                     memory_available_mb=psutil.virtual_memory().available / 2**20,
                     temperature_c=_temperature_c(), battery_percent=battery_percent, power_plugged=power_plugged)


def _status_kib(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (Linux); {} where the file cannot be read."""
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    found[name] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return found


def rss_bytes() -> int:
    """This process's resident set now."""
    kib = _status_kib("VmRSS")
    return kib["VmRSS"] * 1024 if kib else psutil.Process().memory_info().rss


class ResidentSet:
    """This process's resident set from now on: `baseline` is its size at construction, `peak()` the
    most it has held since. On Linux construction starts a new kernel high-water mark (VmHWM, via
    /proc/self/clear_refs), and every figure comes from /proc/self/status (VmRSS, VmHWM).

    The kernel keeps its RSS counters in per-thread or per-CPU batches and raises the high-water
    mark lazily (when memory is unmapped, not on every fault), so VmHWM can read a few pages below
    an RSS read a moment earlier: a process that shrank after its baseline reported peak < baseline
    (628,350,976 < 628,363,264 bytes in one CI run). A peak is the largest size the process had,
    and the baseline and the current RSS are sizes it had: peak() is never below either."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak resident set size to the current one
        except OSError:
            pass  # not Linux, or not allowed: VmHWM (or ru_maxrss) then covers the whole process
        self.baseline = rss_bytes()

    def peak(self) -> int:
        kib = _status_kib("VmHWM", "VmRSS")
        if "VmHWM" in kib:
            kernel = max(kib.values()) * 1024
        else:
            import resource  # ru_maxrss: KiB on Linux; the whole process's life
            kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(kernel, self.baseline, rss_bytes())


if __name__ == "__main__":
    import json
    print(json.dumps(read_telemetry().as_dict()))
