"""Shared helpers: compose the app's config the way the CLI does, and run the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lightning_eff.hydra_config import config_dir

REPO = Path(__file__).resolve().parent.parent


def compose_app_config(overrides: list[str]) -> DictConfig:
    """The config `lightning-eff <overrides>` would run with."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_cli(
    args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m lightning_eff ARGS` in `cwd`, with output captured."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lightning_eff", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_report(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture
def quiet_trainer_kwargs() -> Iterator[dict[str, Any]]:
    yield {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the tiny test models: on a busy 2-core machine the second thread spins waiting for
    a core, about 20x slower (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
