"""`LightningEffCLI`: Lightning's `LightningCLI` with the suite's config errors as one line, not a traceback.

The callbacks and registered strategies work in a plain `LightningCLI` as they are (`--trainer.callbacks+=
lightning_eff.GradualPruning`, `--trainer.strategy=ddp_powersgd`). What this subclass adds: a `ConfigError`
raised by one of them (``target_sparsity=1.5: must be in [0, 1)``) reaches the user under jsonargparse's
instantiation errors, about 80 lines of them; here it is printed as
``lightning-eff: error: GradualPruning: target_sparsity=1.5: must be in [0, 1)`` with exit status 2, as the
`lightning-eff` app does.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_eff.validation import ConfigError


def find_config_error(error: BaseException) -> ConfigError | None:
    """The `ConfigError` that `error` wraps (through its causes and contexts), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def raised_by(error: ConfigError) -> str | None:
    """The name of the class whose constructor raised `error` (the innermost `__init__` in its traceback)."""
    owner = None
    traceback: TracebackType | None = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            owner = type(frame.f_locals["self"]).__name__
        traceback = traceback.tb_next
    return owner


def config_error_line(error: ConfigError) -> str:
    """One line: the class that refused the value, if known, then the key, the value and the rule."""
    owner = raised_by(error)
    return f"lightning-eff: error: {owner + ': ' if owner else ''}{error}"


class LightningEffCLI(LightningCLI):
    """`LightningCLI`, except that the suite's `ConfigError`s end the program with one line and exit status 2.

    Example::

        from lightning_eff.lightning_cli import LightningEffCLI

        LightningEffCLI(MyModule, MyDataModule)

    then ``python main.py fit --trainer.callbacks+=lightning_eff.GradualPruning
    --trainer.callbacks.target_sparsity=0.8 --trainer.strategy=ddp_powersgd``. Any other error is raised as
    `LightningCLI` raises it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except Exception as error:
            config_error = find_config_error(error)
            if config_error is None:
                raise
            print(config_error_line(config_error), file=sys.stderr)
            sys.exit(2)
