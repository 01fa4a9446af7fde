"""Shared fixtures for the CPU tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepserve.testing import tiny_checkpoint


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test draws the same random inputs on every run: tolerances checked once stay checked (unseeded,
    a kernel test's float16 comparison failed about one run in six on an unlucky draw)."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A fresh tiny checkpoint (2 shards + index) for this test session."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def real_server(tmp_path_factory):
    """The real `stepserve serve` (tiny model, CPU) with the seed's parsers, serving the seed's model name;
    images go through worker processes, as they do by default on a GPU host."""
    from real_server import SEED_MODEL, RealServer

    server = RealServer(["--served-model-name", SEED_MODEL, "--reasoning-parser", "deepseek-r1",
                         "--tool-call-parser", "hermes", "--image-workers", "2"], tmp_path_factory.mktemp("server") / "serve.log")
    yield server
    server.stop()
