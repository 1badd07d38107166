"""`LocalSGD`: post-local SGD (Lin et al., 2018), torch's engine behind the strategy's `compression=` argument.

Dense DDP for `warmup_steps` optimizer steps (torch's `post_localSGD_hook` allreduces every gradient), then no
gradient communication at all: each rank steps on its own gradients, and torch's `PeriodicModelAverager`
averages the parameters every `period` steps after the optimizer step. For links too slow even for PowerSGD:
one parameter allreduce per `period` steps instead of one gradient allreduce per step.

No `from __future__ import annotations` here: DDP's `register_comm_hook` compares the hook's annotations with
`dist.GradBucket` and `torch.futures.Future[torch.Tensor]` as objects, and strings would fail that check.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import average_parameters, get_params_to_average
from torch.optim import Optimizer

from lightning_eff.compression.base import Compressor
from lightning_eff.compression.stats import CompressionStats, Traffic
from lightning_eff.compression.transport import BucketLayout, Collectives
from lightning_eff.validation import check_int


@dataclass(eq=False)
class LocalSGD(Compressor):
    """Post-local SGD: dense DDP for `warmup_steps` optimizer steps, then local steps with the parameters
    averaged every `period` steps (torch's `post_localSGD_hook` and `PeriodicModelAverager`).

    Steps count optimizer steps, so with gradient accumulation a period is `period` optimizer steps (each of
    `accumulate_grad_batches` micro-batches). As in torch, the first average is right after the first local step
    (step `warmup_steps`), then every `period` steps. Only `EfficientDDPStrategy` runs it: it is no per-bucket
    compressor (`compressed_mean` refuses), FSDP2 refuses it (each rank holds only a shard of the parameters).

    Args:
        period: optimizer steps between parameter averagings, >= 2 (1 would send as much as DDP, every step).
        warmup_steps: dense DDP steps before local SGD starts, >= 0; torch suggests about 10% of the run.

    Example::

        EfficientDDPStrategy(compression=LocalSGD(period=8, warmup_steps=100))
    """

    name: ClassVar[str] = "local_sgd"
    warmup_argument: ClassVar[str] = "warmup_steps"  # the knob `check_warmup`'s warning names
    period: int = 8
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        check_int("period", self.period, 2)
        check_int("warmup_steps", self.warmup_steps, 0)

    @property
    def compress_from(self) -> int:
        return self.warmup_steps

    def needs_finite_input(self, step: int) -> bool:
        return False

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        raise TypeError(
            "LocalSGD averages parameters after the optimizer step, not gradient buckets: use it as "
            "EfficientDDPStrategy(compression=LocalSGD(...)), not inside a CompressionHook or Auto"
        )


def _payload_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LocalSGDRun:
    """torch's post-local SGD for one DDP run: the comm hook's state, the averager, and what each sent.

    The hook wraps `post_localSGD_hook` with ``post_local_gradient_allreduce=False`` (after warm-up no gradient
    is sent at all; torch's default would allreduce within each node, through subgroups sized by CUDA devices)
    and counts the bytes; `after_optimizer_step` runs `PeriodicModelAverager` and closes the step's stats.
    The averager's counter is the one step counter (optimizer steps); DDP calls the hook only on synchronizing
    backwards, so gradient accumulation's micro-batches do not count.
    """

    def __init__(self, local_sgd: LocalSGD, stats: CompressionStats) -> None:
        self.local_sgd = local_sgd
        self.stats = stats
        self.state = PostLocalSGDState(
            process_group=None,
            subgroup=None,
            start_localSGD_iter=local_sgd.warmup_steps,
            post_local_gradient_allreduce=False,
        )
        self.averager = PeriodicModelAverager(period=local_sgd.period, warmup_steps=local_sgd.warmup_steps)
        self.averaged_last_step = False

    @property
    def step(self) -> int:
        """Optimizer steps taken (the averager's counter: it advances once per step)."""
        return int(self.averager.step)

    @property
    def local(self) -> bool:
        """Whether the step in progress is past warm-up (no gradient allreduce)."""
        return self.step >= self.local_sgd.warmup_steps

    def hook(self, state: PostLocalSGDState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """The DDP comm hook: torch's, with this bucket's bytes counted (dense during warm-up, none after)."""
        started = time.perf_counter()
        buffer = bucket.buffer()
        dense = buffer.numel() * buffer.element_size()
        # One step counter for both: a step without a synchronizing backward (a skipped training_step) still
        # steps the averager, and the hook must not then allreduce one step past warm-up.
        state.iter = min(self.step, self.local_sgd.warmup_steps)
        future = post_localSGD_hook(state, bucket)  # asynchronous during warm-up, as DDP's own allreduce
        sent = 0 if self.local else dense
        self.stats.record_bucket(
            Traffic(bytes_dense=dense, bytes_sent=sent, communicate_seconds=time.perf_counter() - started)
        )
        return future

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        """Average the parameters when due (torch's schedule), then close this step's stats."""
        started = time.perf_counter()
        local = self.local
        due = local and (self.step - self.local_sgd.warmup_steps) % self.local_sgd.period == 0
        sent = _payload_bytes(get_params_to_average(optimizer.param_groups)) if due else 0
        self.averager.average_parameters(optimizer.param_groups)
        self.averaged_last_step = due
        if due:
            self.stats.record_bucket(Traffic(bytes_sent=sent, communicate_seconds=time.perf_counter() - started))
        if local and self.stats.first_compressed_step is None:
            self.stats.first_compressed_step = self.stats.steps  # the first step without a gradient allreduce
        self.stats.end_step()

    def average_now(self, optimizer: Optimizer) -> None:
        """One extra average (at the end of training), unless the last step averaged already; counted in the
        run's total bytes, not as a step."""
        if not self.local or self.averaged_last_step:
            return
        started = time.perf_counter()
        # Every trainable parameter, not torch's "has a gradient" filter: gradients may be gone by the end of fit.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            return
        average_parameters(iter(params), self.averager.process_group)
        self.stats.total.add(
            Traffic(bytes_sent=_payload_bytes(params), communicate_seconds=time.perf_counter() - started)
        )
        self.averaged_last_step = True

    def state_dict(self) -> dict[str, Any]:
        """The hook's and the averager's step counters and the stats (the same on every rank)."""
        return {
            "name": self.local_sgd.name,
            "hook_iter": self.state.iter,
            "averager_step": self.step,
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_sgd.load_state_dict(state)
        self.state.iter = int(state["hook_iter"])
        self.averager.step = int(state["averager_step"])
        self.stats.load_state_dict(state["stats"])
