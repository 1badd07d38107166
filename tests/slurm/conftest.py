"""A real two-node SLURM cluster on this machine (scripts/slurm-local), shared by the SLURM tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "slurm-local"
LIGHTNING_EFF = Path(sys.executable).parent / "lightning-eff"


def _slurm_local(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Environment for sbatch/srun against a two-node local cluster (n1, n2); started here unless it runs."""
    if shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
        pytest.skip("slurm-wlm is not installed (apt-get install -y slurm-wlm munge; .ci/run does this)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    status = _slurm_local("status")
    started_here = "n[1-2]" not in status.stdout
    if started_here:
        _slurm_local("down")
        up = _slurm_local("up", "2")
        assert up.returncode == 0, up.stderr[-3000:]
    conf = _slurm_local("env").stdout.strip().split("=", 1)[1]
    env = {**os.environ, "SLURM_CONF": conf, "PYTHONWARNINGS": "ignore", "LIGHTNING_EFF": str(LIGHTNING_EFF)}
    env["PATH"] = f"{LIGHTNING_EFF.parent}:{env.get('PATH', '')}:/usr/sbin"
    yield env
    if started_here:
        _slurm_local("down")
