"""The capabilities, named once: their config groups, which of them configure the strategy, and the checks a
capability's object may offer the app.

`config.py`, `hydra_config.py` and `cli.py` derive their lists from `CAPABILITIES`, and a test checks that
every declared group has a `none` member and a default in `conf/train.yaml`, so a new capability cannot go
missing from one of them (or from users' own Hydra apps) without a failing test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn


@dataclass(frozen=True)
class Capability:
    """One capability as the app composes it.

    Args:
        group: its config group (`conf/<group>/`, the `lightning_eff/<group>` group in users' Hydra apps).
        strategy_argument: the `EfficientDDPStrategy` argument its object fills; None for a callback.
        across_ranks: what it does between processes (``"compresses gradients"``), for the error when the
            trainer runs one; None if it works in one process.
    """

    group: str
    strategy_argument: str | None = None
    across_ranks: str | None = None


CAPABILITIES = (
    Capability("pruning"),
    Capability("quantization"),
    Capability("distillation"),  # after pruning and QAT: its projections (if any) stay outside their selection
    Capability("compression", strategy_argument="compression", across_ranks="compresses gradients"),
    Capability("balancing", strategy_argument="balancer", across_ranks="balances work"),
)
CAPABILITY_GROUPS = tuple(capability.group for capability in CAPABILITIES)
# The groups a user's own Hydra app can compose; `experiment/` and `hydra/` belong to the `lightning-eff` app.
SHARED_GROUPS = ("trainer", "model", "data", *CAPABILITY_GROUPS)


@runtime_checkable
class ChecksModel(Protocol):
    """A capability that can check itself against the model before training (e.g. include patterns that match
    no layer); it raises `ConfigError` with its own argument as the key."""

    def check_model(self, model: nn.Module) -> object: ...


@runtime_checkable
class ChecksWorldSize(Protocol):
    """A capability with a rule that depends on the number of processes (e.g. a balancer's `min_share`); it
    raises `ConfigError` with its own argument as the key."""

    def check_world_size(self, world_size: int) -> None: ...
