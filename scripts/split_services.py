"""Start cloud-service and the link emulator as subprocesses on loopback (for the split
benchmark and demo; not imported by the packages).

    with CloudService(repo) as cloud, LinkEmu(cloud.address, delay_ms=40, rate_mbit=5) as link:
        ...  # connect to link.address
"""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Process:
    pattern = None

    def _start(self, cmd, what):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            match = re.search(self.pattern, line or "")
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                return
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        raise SystemExit(f"{what} did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class CloudService(_Process):
    pattern = r"grpc://[^:]+:(\d+)"

    def __init__(self, repository: Path, port: int = 0):
        self._start([sys.executable, "-m", "cloud_service.cli", "serve", "--repository", str(repository),
                     "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"], "cloud-service")


class LinkEmu(_Process):
    pattern = r"listening on [^:]+:(\d+)"

    def __init__(self, target: str, delay_ms: float, rate_mbit: float):
        self._start([sys.executable, str(ROOT / "scripts" / "linkemu.py"), "--listen", "127.0.0.1:0",
                     "--target", target, "--delay-ms", str(delay_ms), "--rate-mbit", str(rate_mbit)], "linkemu")
