"""Where the Hydra configs live, and how a user's own Hydra app reaches them."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lightning_eff.capabilities import SHARED_GROUPS

_PACKAGE_HEADER = re.compile(r"^#\s*@package\s+(\S+)", re.MULTILINE)


def default_run_dir() -> str:
    """`outputs/slurm-<job id>` inside a SLURM job (every task and a requeued job agree on it), else a timestamp."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"outputs/slurm-{job}" if job else f"outputs/{datetime.now():%Y-%m-%d_%H-%M-%S}"


if not OmegaConf.has_resolver("lightning_eff_run_dir"):
    OmegaConf.register_new_resolver("lightning_eff_run_dir", default_run_dir, use_cache=True)


def config_dir() -> Path:
    """The `conf/` directory: inside the installed package (a wheel) or at the top of a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"lightning_eff's conf/ is neither in {package} nor in {package.parent}")


def register_config_groups(prefix: str = "lightning_eff") -> None:
    """Store the shared config groups in Hydra's ConfigStore under `prefix/`.

    Then a user's primary config can say ``defaults: [lightning_eff/pruning@pruning: gradual_magnitude]``.
    The installed Hydra plugin (`hydra_plugins/lightning_eff_searchpath`) calls this on every Hydra start.
    """
    store = ConfigStore.instance()
    for group in SHARED_GROUPS:
        for path in sorted((config_dir() / group).glob("*.yaml")):
            text = path.read_text()
            header = _PACKAGE_HEADER.search(text)
            node = OmegaConf.create(OmegaConf.load(path) or {})
            store.store(
                name=path.stem,
                node=node,
                group=f"{prefix}/{group}",
                package=header.group(1) if header else None,
                provider="lightning_eff",
            )
