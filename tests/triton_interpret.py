"""Triton kernels on the CPU, under Triton's interpreter.

Triton picks interpreter or compiler when each @triton.jit function is defined (its own library, such as
tl.cdiv, included), so a test module imports this before anything imports triton.
"""

from __future__ import annotations

import os
import sys

import pytest

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


def interpreted_triton():
    """The triton module, running on its interpreter (the test is skipped where triton is not installed)."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.cdiv, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (by an earlier test module): "
                    "run this file on its own, or set TRITON_INTERPRET=1 for the whole CPU test run")
    return triton
