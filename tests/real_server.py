"""The real server as a subprocess, for end-to-end tests: `stepserve serve` (or `python -m
stepserve.launch_server`) on a free port, the tiny model on CPU, its output in a log file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVE = ("-m", "stepserve.cli", "serve")            # what the `stepserve serve` console script runs
LAUNCH_SERVER = ("-m", "stepserve.launch_server")   # the seed's module, renamed
SEED_MODEL = "stepfun-ai/Step3-VL-10B"  # the name the seed's calls send; served here by the tiny model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealServer:
    """Starts on construction, waits for /health; `stop()` sends a signal and returns the exit code."""

    def __init__(self, flags: list[str], log_path: Path, entry: tuple[str, ...] = SERVE, startup_timeout: float = 90):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")  # CPU tests, even on a GPU host
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, *entry, *flags, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> int:
        """Signal the server (Ctrl-C by default) and wait; killed if it outlives `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
