"""Run a worker module of the tests package as its own program: `python -m tests.<pkg>.<module> ARGS`.

The module is found through PYTHONPATH (the repository root), so the process may run in any directory, and
Lightning's subprocess launcher, which starts the other ranks with the same `-m` command and environment,
finds it too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from tests.conftest import REPO


def run_worker(module: ModuleType, args: Sequence[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m <module> ARGS` in `cwd`, with output captured."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", module.__name__, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
