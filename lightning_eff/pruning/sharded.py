"""GradualPruning under FSDP2: masks kept as shards of the parameters they mask, and checkpointed sharded.

FSDP2 keeps each parameter as a `DTensor` sharded along dim 0 between steps. The callback masks the local
shard (`sharding.local_shard`), picks the global threshold with `sharded_select.ShardedSelector`, and never
holds a full-size mask. Lightning's `ModelParallelStrategy` writes a distributed checkpoint (a directory) but
saves callback state from rank 0 only, so the mask shards go beside it: `attach_mask_saving` makes the
strategy also write them with `torch.distributed.checkpoint` into ``<checkpoint>/MASK_DIR``, which
`load_mask_shards` reads back on resume. The model's own state dict is untouched, so a consolidated
checkpoint loads strictly into the plain model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_eff.validation import ConfigError

MASK_DIR = "lightning_eff_pruning_masks"
Masks = Mapping[str, torch.Tensor]


def shard_group(parameters: Mapping[str, torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group the targeted parameters are sharded over; None when none is a DTensor.

    Supported: FSDP2 (a 1-D mesh, ``Shard(0)``) and HSDP (``Replicate``, ``Shard(0)``): counting over the
    sharded mesh dimension is exact. Anything else (tensor parallelism) is one `ConfigError`.
    """
    group: dist.ProcessGroup | None = None
    for name, parameter in parameters.items():
        if not isinstance(parameter, DTensor):
            if group is not None:
                raise ConfigError("strategy", "model_parallel", f"GradualPruning: {name} is not sharded but others are")
            continue
        sharded = [dim for dim, placement in enumerate(parameter.placements) if placement.is_shard()]
        if len(sharded) != 1 or parameter.placements[sharded[0]] != Shard(0):
            raise ConfigError(
                "strategy", "model_parallel",
                f"GradualPruning supports parameters sharded along dim 0 on one mesh dimension (FSDP2, HSDP); "
                f"{name} has placements {parameter.placements}",
            )  # fmt: skip
        group = parameter.device_mesh.get_group(sharded[0])
    return group


def check_nm_shards(parameters: Mapping[str, torch.Tensor], layouts: Mapping[str, tuple[int, int]], m: int) -> None:
    """N:M groups run along the input dimension: a shard boundary must not cut one (HF Conv1D is [in, out])."""
    for name, parameter in parameters.items():
        if not isinstance(parameter, DTensor) or layouts.get(name, (0, 1))[1] % parameter.dim() != 0:
            continue  # sharded along the output dimension: every shard holds whole rows, whole groups
        rows = -(-parameter.shape[0] // parameter.device_mesh.size())  # torch.chunk's shard size
        if rows % m:
            raise ConfigError(
                "pattern", f"{m}", f"{name} is sharded along its input dimension in blocks of {rows} rows, which "
                f"cuts groups of {m}; N:M needs shards that hold whole groups",
            )  # fmt: skip


def count_zeros(local: Mapping[str, torch.Tensor], group: dist.ProcessGroup | None) -> dict[str, int]:
    """Exact zeros of each parameter over all shards (a collective)."""
    if not local:
        return {}
    zeros = torch.stack([(tensor == 0).sum().to(torch.int64).cpu() for tensor in local.values()])
    dist.all_reduce(zeros, group=group)
    return dict(zip(local, zeros.tolist(), strict=True))


def _as_dtensor(local: torch.Tensor, like: DTensor) -> DTensor:
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def full_masks(masks: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole masks from shards, on every rank (a collective): for a checkpoint saved as one file."""
    return {name: _as_dtensor(mask.cpu(), parameters[name]).full_tensor() for name, mask in masks.items()}  # type: ignore[arg-type]


def shard_full_masks(
    masks: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """This rank's pieces of whole masks (from a one-file checkpoint), cut as the parameters are."""
    shards: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        parameter = parameters[name]
        assert isinstance(parameter, DTensor)
        piece = distribute_tensor(mask.cpu(), parameter.device_mesh, parameter.placements, src_data_rank=None)
        shards[name] = piece.to_local()
    return shards


def save_mask_shards(
    directory: Path, masks: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor]
) -> None:
    """Every rank writes its mask shards with `torch.distributed.checkpoint` (a collective)."""
    state = {name: _as_dtensor(mask.cpu(), parameters[name]) for name, mask in masks.items()}  # type: ignore[arg-type]
    dcp.save(state, checkpoint_id=directory)


def load_mask_shards(
    directory: Path, names: list[str], parameters: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """This rank's mask shards from `save_mask_shards`' directory (a collective)."""
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"GradualPruning: the checkpoint has no mask shards at {directory}")
    state = {}
    for name in names:
        parameter = parameters[name]
        assert isinstance(parameter, DTensor)
        state[name] = _as_dtensor(torch.zeros(parameter.to_local().shape, dtype=torch.bool), parameter)
    dcp.load(state, checkpoint_id=directory)
    return {name: tensor.to_local() for name, tensor in state.items()}


def attach_mask_saving(strategy: Any, write: Callable[[Path], None]) -> None:
    """Make `strategy.save_checkpoint` also call ``write(checkpoint_dir / MASK_DIR)`` on every rank, once.

    Lightning's `ModelParallelStrategy` calls `save_checkpoint` on every rank (the distributed checkpoint is a
    collective), so the mask shards are written at each checkpoint, into the directory it just wrote.
    """
    if getattr(strategy, "_lightning_eff_mask_writer", None) is not None:
        strategy._lightning_eff_mask_writer = write  # a later fit's callback replaces the writer
        return
    strategy._lightning_eff_mask_writer = write
    save = strategy.save_checkpoint

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        save(checkpoint, filepath, storage_options)
        path = Path(strategy.broadcast(filepath))
        if path.is_dir():
            strategy._lightning_eff_mask_writer(path / MASK_DIR)

    strategy.save_checkpoint = save_checkpoint
