"""Where the Hydra configs live, and how a user's own Hydra app reaches them."""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# Groups a user's app can compose; `experiment/` and `hydra/` belong to the `lightning-eff` app itself.
SHARED_GROUPS = ("trainer", "model", "data", "pruning", "quantization", "compression", "balancing")
_PACKAGE_HEADER = re.compile(r"^#\s*@package\s+(\S+)", re.MULTILINE)


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
