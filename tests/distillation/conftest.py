"""Shared fixtures of the distillation tests: one CPU thread (the machine's cores are shared)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """Every distillation test runs with tests/conftest.py's `one_torch_thread`."""
