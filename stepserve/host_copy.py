"""Host-to-device copies that never wait for the GPU.

With overlap scheduling the host queues step N+1 while the GPU runs step N. A blocking copy (`.to(device)`,
`torch.tensor(..., device=...)`) is a cudaMemcpy followed by a stream sync: the host would wait for everything
already queued, step N and whatever of N+1 came before the copy, and the GPU would then idle while the host
queues the rest. Measured on the H100 at concurrency 100: ~10 ms of idle GPU per step that ran the vision tower.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device`; on CUDA queued from pinned memory, returning at once (the caching host allocator
    keeps the pinned block until the copy has run)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
