"""The examples run as shipped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_existing_trainer_example_trains() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "existing_trainer.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-3] == "quantized=QuantizedLinear"  # QAT converted the hidden layer after fit
    assert float(lines[-2].split("=")[1]) == pytest.approx(0.6, abs=0.005)  # GradualPruning reached its target
    assert float(lines[-1].split("=")[1]) < 0.5  # it learned: ln(10) = 2.3 at chance
