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

from lightning_eff.validation import check


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
# `trainer.strategy` values whose strategy takes the capabilities' strategy arguments: EfficientDDPStrategy for
# ddp and auto, EfficientModelParallelStrategy for fsdp2 (registered by lightning_eff.strategies).
DDP_STRATEGIES = ("ddp", "auto")
SHARDED_STRATEGIES = ("fsdp2",)
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


def check_strategy(group: str, strategy: str) -> None:
    """A capability that configures the strategy (`strategy_argument`) needs one that takes it: DDP or FSDP2.

    Lightning's `FSDPStrategy` (``fsdp``, FSDP1) and the others have no place for a compressor or a balancer, so
    choosing one with them is refused here rather than ignored.
    """
    check(strategy in DDP_STRATEGIES + SHARDED_STRATEGIES, "trainer.strategy", strategy,
          f"must be ddp (or auto), or fsdp2 for sharded training (trainer=fsdp_cpu, trainer=fsdp), when a {group} "
          "group is chosen; Lightning's fsdp (FSDP1) has no place for it")  # fmt: skip
