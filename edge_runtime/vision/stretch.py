"""Emulating a slower device on this machine (benchmarks): device-side work stretched to
`slowdown` times the fastest it runs here warm, sleeping for the difference.

    stretch = Stretch(slowdown_for("profile", profile))      # this machine's peak / the profile's
    y = stretch(("stage", 0), run_stage, 0, x)

The fastest time per key is first measured back to back (5 runs), then kept as a running minimum:
a device that computes all the time stays warm, this machine between sleeps does not, and
contention here is not multiplied.
"""
import time


def slowdown_for(option, profile) -> float:
    """A pipeline's `slowdown` option: a number >= 1, or "profile" (this machine's fp32 peak over
    the device profile's, at least 1)."""
    if option == "profile":
        from devices.probe import peak_gflops
        return max(1.0, peak_gflops() / profile.fp32_gflops)
    value = float(option)
    if value < 1:
        raise ValueError(f"slowdown {option}: expected >= 1 (1 = this machine's speed) or \"profile\"")
    return value


class Stretch:
    def __init__(self, slowdown: float = 1.0):
        if slowdown < 1:
            raise ValueError(f"slowdown {slowdown}: expected >= 1 (1 = this machine's speed)")
        self.slowdown, self._fastest = slowdown, {}

    def __call__(self, key, fn, *args):
        if self.slowdown <= 1:
            return fn(*args)
        if key not in self._fastest:             # its warm cost, measured back to back
            self._fastest[key] = min(_seconds(fn, *args) for _ in range(5))
        start = time.perf_counter()
        result = fn(*args)
        took = time.perf_counter() - start
        fastest = self._fastest[key] = min(self._fastest[key], took)
        extra = start + self.slowdown * fastest - time.perf_counter()
        if extra > 0:
            time.sleep(extra)
        return result


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start
