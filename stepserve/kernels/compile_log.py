"""Reports every Triton kernel built after start-up: a request that pays a JIT compile shows up in the log.

Triton compiles a kernel again for each new specialization of its arguments (an integer that becomes 1 or
divisible by 16, a new constexpr, a new dtype), on the call that first needs it. The engine's warm-up builds
the common ones; `watch_compiles()`, called after it, logs any later build with the time it took, which is the
time some user's request waited. (torch.compile's own kernels do not pass through here: TORCH_LOGS=recompiles.)
"""

from __future__ import annotations

import logging
import time

import triton

log = logging.getLogger(__name__)


def watch_compiles(enable: bool = True) -> None:
    """Log each later Triton build at WARNING (enable=False removes the hooks)."""
    started: dict[object, float] = {}

    def before(*, key, **_) -> bool:
        started[key] = time.perf_counter()
        return False  # a true value would skip the compile

    def after(*, key, repr, **_) -> None:
        took = time.perf_counter() - started.pop(key, time.perf_counter())
        log.warning("built a Triton kernel after start-up in %.2f s (a specialization the warm-up did not "
                    "cover): %s", took, " ".join(str(repr).split()))  # one line, whatever the signature holds

    triton.knobs.runtime.jit_cache_hook = before if enable else None
    triton.knobs.runtime.jit_post_compile_hook = after if enable else None
