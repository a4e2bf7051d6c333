"""Start `cloud-service serve` and `edge-runtime agent` as real subprocesses on loopback, for tests."""
import os
import socket
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY_LINE = re.compile(r"serving grpcs?://[^:]+:(\d+)")


class ServedProcess:
    """A subprocess that prints `... serving grpc://HOST:PORT` once it listens."""

    def __init__(self, cmd: list, what: str, start_timeout_s: float = 60.0):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._port_found = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port_found.wait(start_timeout_s) or self.port is None:
            self.kill()
            raise RuntimeError(f"{what} did not start:\n" + "".join(self.lines))
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = READY_LINE.search(line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self._port_found.set()
        self._port_found.set()  # process ended: stop waiting

    def terminate(self, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        time.sleep(0)
        return "".join(self.lines)

    def wait_for(self, text: str, timeout_s: float = 60.0) -> str:
        """Wait until a line containing `text` is printed; returns that line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None and not any(text in line for line in self.lines):
                break
            time.sleep(0.05)
        raise TimeoutError(f"no line with {text!r} within {timeout_s} s:\n{self.output()}")


class ServerProcess(ServedProcess):
    def __init__(self, repository: Path, *extra: str, start_timeout_s: float = 60.0):
        super().__init__([sys.executable, "-m", "cloud_service.cli", "serve", "--repository", str(repository),
                          "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING", *extra],
                         "cloud-service", start_timeout_s)


class AgentProcess(ServedProcess):
    """`edge-runtime agent --config FILE` (the file's [serve] port may be 0: a free one)."""

    def __init__(self, config: Path, *extra: str, start_timeout_s: float = 60.0):
        super().__init__([sys.executable, "-m", "edge_runtime.cli", "agent", "--config", str(config), *extra],
                         "edge-runtime agent", start_timeout_s)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
