"""Torch-profiler traces of the serving engine, for the /start_profile and /stop_profile routes (SGLang's names).

The engine thread starts and stops the profiler between steps, so a trace holds whole steps. The host phases of
a step carry labels (`schedule`, `launch`, `wait`, `collect`, `deliver`) so that a gap in the GPU's timeline can be put
down to the host work that left it idle (`benchmarks/trace_gaps.py`). Profiling is on only where the server was
started with STEPSERVE_TORCH_PROFILER_DIR set: traces are written there and nowhere else.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from stepserve.errors import InvalidRequestError

PROFILER_DIR_ENV = "STEPSERVE_TORCH_PROFILER_DIR"


class EngineProfiler:
    def __init__(self) -> None:
        self._prof: torch.profiler.profile | None = None
        self._path: Path | None = None
        self._steps_left: int | None = None

    def start(self, num_steps: int | None = None, with_stack: bool = False) -> str:
        """Start recording; with num_steps, stop by itself after that many engine steps. Returns the trace path."""
        out = os.environ.get(PROFILER_DIR_ENV)
        if not out:
            raise InvalidRequestError(f"profiling is off: start the server with {PROFILER_DIR_ENV}=<dir>")
        if self._prof is not None:
            raise InvalidRequestError("a profile is already being recorded: POST /stop_profile first")
        Path(out).mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, with_stack=with_stack)
        self._prof.start()
        self._path = Path(out) / f"stepserve-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.trace.json"
        self._steps_left = num_steps
        return str(self._path)

    def step(self) -> str | None:
        """Count an engine step; when the requested steps are recorded, stop and return the trace's path."""
        if self._steps_left is None:
            return None
        self._steps_left -= 1
        return self.stop() if self._steps_left <= 0 else None

    def stop(self) -> str:
        """Stop recording and write the Chrome trace; returns its path."""
        if self._prof is None:
            raise InvalidRequestError("no profile is being recorded: POST /start_profile first")
        prof, path = self._prof, self._path
        self._prof = self._path = self._steps_left = None
        prof.stop()
        prof.export_chrome_trace(str(path))
        return str(path)
