"""Gradient compression under FSDP2 (`fully_shard`): what its reduce-scatter allows, and what it does not.

FSDP2 averages gradients with one reduce-scatter per sharded module: it copies every gradient of the module
into one flat buffer laid out shard by shard (rank r's rows of every parameter, then rank r+1's) and each rank
receives the sum of its own part. Torch 2.13 lets that collective be replaced (`FSDPModule.
set_custom_reduce_scatter`, a `ReduceScatter` comm); `CastReduceScatter` uses it to send the buffer in bfloat16
or float16 and counts the bytes as `CompressionHook` does for DDP, so the same stats, logs and report follow.

PowerSGD, TopK and Int8 do not apply to sharded gradients, and are refused before training
(`require_sharded_compressor`):

- the comm sees a flat buffer cut by rank, not gradient matrices: PowerSGD's factors need each whole matrix,
  TopK selects within each whole parameter, Int8 agrees its scales per parameter; all three would first have
  to gather the whole gradient, which a reduce-scatter exists to avoid;
- their error feedback keeps a residual of the whole gradient on every rank, an fp32 copy of the full model
  that sharding exists to avoid holding;
- a reduce-scatter sums in the wire type: only float types whose sum does not need a per-rank agreement
  (bf16, fp16) fit it; Int8's integer levels and TopK's (value, index) pairs are not summable shard by shard.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from lightning_eff.compression.base import Compressor, Dense
from lightning_eff.compression.casts import Cast
from lightning_eff.compression.communication import CompressedCommunication
from lightning_eff.compression.stats import CompressionStats, Traffic
from lightning_eff.validation import ConfigError

WHY_NOT_SHARDED = {
    "powersgd": "needs each whole gradient matrix and a full-size error-feedback residual on every rank",
    "topk": "selects within each whole gradient and keeps a full-size error-feedback residual on every rank",
    "int8": "agrees scales per whole parameter and sums integer levels, which a float reduce-scatter cannot",
    "auto": "probes PowerSGD, which needs each whole gradient matrix on every rank",
}


def require_sharded_compressor(compressor: Compressor) -> Cast | Dense:
    """`compressor` if FSDP2's reduce-scatter can run it (bf16, fp16, dense), else a one-line `ConfigError`."""
    if isinstance(compressor, (Cast, Dense)):
        return compressor
    reason = WHY_NOT_SHARDED.get(compressor.name, "needs whole gradients, which FSDP2's reduce-scatter never holds")
    raise ConfigError(
        "compression",
        compressor.name,
        f"does not apply to FSDP2's sharded gradients ({reason}); use bf16, fp16 or none",
    )


class CastReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter sent in the compressor's narrower float type; bytes and seconds counted into `stats`.

    FSDP2 asks for an average (``ReduceOp.AVG``) when it reduces in float32 or bfloat16: the buffer is divided by
    the number of ranks before the cast and summed, as `Cast` does for DDP, so float16 cannot overflow in the sum.
    A buffer already that narrow (a `MixedPrecisionPolicy(reduce_dtype=...)`) goes as it is. The collective is
    waited for here (on CPU gloo runs it in place anyway), so the seconds are real.

    Args:
        compressor: `BF16`, `FP16`, or `Dense` (counts bytes, sends float32).
        stats: where each reduce-scatter's traffic is added; the strategy closes a step after the optimizer step.
        dense_element_size: bytes per element of the parameters (4 for float32), what a plain reduce-scatter sends.
    """

    def __init__(self, compressor: Cast | Dense, stats: CompressionStats, dense_element_size: int) -> None:
        self.compressor = compressor
        self.stats = stats
        self.dense_element_size = dense_element_size

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: dist.ProcessGroup,
        op: dist.ReduceOp | dist.ReduceOp.RedOpType,
        async_op: bool = False,
    ) -> dist.Work | None:
        started = time.perf_counter()
        wire = getattr(self.compressor, "dtype", input_tensor.dtype)
        narrow = input_tensor.element_size() > torch.finfo(wire).bits // 8
        if narrow:
            if op == dist.ReduceOp.AVG:
                input_tensor = input_tensor.div(group.size())
                op = dist.ReduceOp.SUM
            send, receive = input_tensor.to(wire), output_tensor.new_empty(output_tensor.shape, dtype=wire)
        else:
            send, receive = input_tensor, output_tensor
        cast_seconds = time.perf_counter() - started
        dist.reduce_scatter_single(output=receive, input=send, group=group, op=op)
        communicated = time.perf_counter() - started - cast_seconds
        if narrow:
            output_tensor.copy_(receive)
        traffic = Traffic(
            bytes_dense=input_tensor.numel() * self.dense_element_size,
            bytes_sent=send.numel() * send.element_size(),
            compress_seconds=time.perf_counter() - started - communicated,
            communicate_seconds=communicated,
        )
        self.stats.record_bucket(traffic)
        return None


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The modules `fully_shard` was applied to, root last (each holds its own reduce-scatter)."""
    modules: list[FSDPModule] = [module for module in model.modules() if isinstance(module, FSDPModule)]
    return modules[::-1]


class ShardedCommunication(CompressedCommunication):
    """A compressor's `CastReduceScatter` on every FSDP2 module of one run, its metrics and report section.

    The casts keep no state between steps, so nothing goes into the checkpoint; the byte counts of a resumed run
    start at its first step.
    """

    def __init__(self, compressor: Compressor) -> None:
        super().__init__(require_sharded_compressor(compressor))
        self.reduce_scatter: CastReduceScatter | None = None

    @property
    def registered(self) -> bool:
        return self.reduce_scatter is not None

    def register_sharded(self, model: nn.Module) -> None:
        """Hand every sharded module of `model` the cast reduce-scatter (after `configure_model`'s `fully_shard`)."""
        modules = fsdp_modules(model)
        if not modules:
            raise ConfigError(
                "compression",
                self.compressor.name,
                "found no module sharded by fully_shard; call it in configure_model",
            )
        compressor = require_sharded_compressor(self.compressor)
        element_size = next(model.parameters()).element_size()
        self.reduce_scatter = CastReduceScatter(compressor, self.stats, dense_element_size=element_size)
        for module in modules:
            module.set_custom_reduce_scatter(self.reduce_scatter)

    def end_step(self) -> None:
        """Close the optimizer step's traffic (every reduce-scatter of its backward passes has run)."""
        if self.reduce_scatter is not None and self.stats.current.bytes_dense:
            self.stats.end_step()

    def gather_state(self, world_size: int) -> list[object] | None:
        return None
