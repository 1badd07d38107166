"""The examples run as shipped."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_existing_trainer_example_trains() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "existing_trainer.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final_loss = float(result.stdout.strip().splitlines()[-1].split("=")[1])
    assert final_loss < 0.5  # it learned: ln(10) = 2.3 at chance
