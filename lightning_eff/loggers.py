"""The app's experiment loggers: CSV, TensorBoard, MLflow (a local file store) and W&B (offline), or none.

Every capability logs through `trainer.loggers` (``pruning/sparsity``, ``quantization/fake_quant``,
``compression/*``, ...), so whichever logger is chosen receives them. MLflow and W&B are optional extras; asking
for one that is not installed is a one-line config error that names the extra.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_eff.validation import ConfigError

LOGGERS = ("csv", "tensorboard", "mlflow", "wandb", "none")
PROJECT = "lightning-eff"

# logger -> (module it needs, the extra that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check_logger_installed(kind: str) -> None:
    """Refuse, in one line naming the extra to install, a logger whose package is missing."""
    if kind in _NEEDS:
        module, extra = _NEEDS[kind]
        if importlib.util.find_spec(module) is None:
            raise ConfigError("logger", kind, f"needs the {module} package: pip install 'lightning-eff[{extra}]'")


def build_logger(kind: str, run_dir: Path) -> Logger | bool:
    """The logger named `kind`, writing under `run_dir`, or False for none.

    - csv: `run_dir/metrics.csv`; tensorboard: `run_dir/tensorboard/`.
    - mlflow: a file store in `run_dir/mlruns` (no server), experiment ``lightning-eff``, the run named after the
      run directory; `MLFLOW_TRACKING_URI`, when set, points it elsewhere (one store for many runs, a server).
    - wandb: offline (`run_dir/wandb/offline-run-*`, upload later with ``wandb sync``) unless `WANDB_MODE` says
      otherwise; project ``lightning-eff`` or `WANDB_PROJECT`.
    """
    check_logger_installed(kind)
    if kind == "csv":
        return CSVLogger(save_dir=run_dir, name="", version="")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="")
    if kind == "mlflow":
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            tracking_uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses its file store unless told: a local store with no server is the point here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MLFlowLogger(experiment_name=PROJECT, run_name=run_dir.name, tracking_uri=tracking_uri)
    if kind == "wandb":
        offline = os.environ.get("WANDB_MODE", "offline") == "offline"
        project = os.environ.get("WANDB_PROJECT", PROJECT)
        return WandbLogger(save_dir=str(run_dir), name=run_dir.name, project=project, offline=offline)
    return False
