"""GPU-only tests: skipped without CUDA; results go to $OUT (when set) as JSON for the benchmarks docs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture
def report():
    """report(name, results): print the results and write them to $OUT/<name>.json when OUT is set."""
    def write(name: str, results: dict) -> None:
        text = json.dumps(results, indent=2)
        print(f"\n{name}: {text}")
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"{name}.json").write_text(text)
    return write
