"""Shared fixtures for the CPU tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepserve.testing import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A fresh tiny checkpoint (2 shards + index) for this test session."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
