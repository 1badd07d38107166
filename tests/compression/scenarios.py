"""What each rank runs in the distributed tests: a small MLP under DDP on gloo, with a `CompressionHook`.

Data depend only on (step, rank), so a resumed run sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_eff.compression import BF16, FP16, Auto, CompressionHook, Compressor, Dense, Int8, PowerSGD, TopK
from lightning_eff.compression.transport import BucketLayout, Collectives

STEPS = 40  # training steps per compressor
POWERSGD_START = 5
SAVED_AT, RESUMED_STEPS = 10, 10
POISON_STEP = 4
TEACHER = torch.randn(64, 64, generator=torch.Generator().manual_seed(7)) / 8
BUCKET_CAP_MB = 0.05  # two buckets: [2.bias, 2.weight] and [0.bias, 0.weight] (layout as rebuilt)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))


def batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(32, 64, generator=generator)
    return x, torch.tanh(x @ TEACHER)


@dataclass
class Run:
    """One DDP model with its hook and optimizer on this rank."""

    module: nn.Module
    ddp: DistributedDataParallel
    hook: CompressionHook | None
    optimizer: torch.optim.Optimizer
    bucket_sizes: dict[int, int] = field(default_factory=dict)
    hook_calls: int = 0

    def loss(self, step: int, rank: int, poison: bool = False) -> Tensor:
        x, y = batch(step, rank)
        if poison:
            x[0, 0] = math.nan
        return nn.functional.mse_loss(self.ddp(x), y)

    def flat_grads(self) -> Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.module.parameters() if p.grad is not None])


def build(compressor: Compressor | None, state: dict[str, Any] | None = None, named: bool = True) -> Run:
    """A fresh model (and optimizer, and hook) on this rank, restored from `state` when given."""
    module = make_model()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.2, momentum=0.9)
    if state is not None:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    ddp = DistributedDataParallel(module, bucket_cap_mb=BUCKET_CAP_MB)
    hook = None if compressor is None else CompressionHook(compressor, module=module if named else None)
    if hook is not None and state is not None and "compression" in state:
        hook.load_state_dict(state["compression"])
    run = Run(module, ddp, hook, optimizer)
    if hook is not None:

        def recording_hook(group, bucket):  # no annotations: under `from __future__`, DDP would reject them
            run.bucket_sizes[bucket.index()] = bucket.buffer().numel()
            run.hook_calls += 1
            return hook(group, bucket)

        ddp.register_comm_hook(None, recording_hook)
    return run


def exact_mean_grads(run: Run, step: int, rank: int, world_size: int) -> Tensor:
    """The uncompressed average gradient, from a plain copy of the model (no DDP, no hook)."""
    reference = make_model()
    reference.load_state_dict(run.module.state_dict())
    x, y = batch(step, rank)
    nn.functional.mse_loss(reference(x), y).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in reference.parameters() if p.grad is not None])
    dist.all_reduce(flat)
    return flat / world_size


def train(rank: int, world_size: int, compressors: dict[str, Compressor | None], steps: int) -> dict[str, Any]:
    """Train one model per compressor from the same start; per step: loss, bytes, distance to the exact mean."""
    results = {}
    for name, compressor in compressors.items():
        run = build(compressor)
        losses, traffic, errors = [], [], []
        for step in range(steps):
            exact = exact_mean_grads(run, step, rank, world_size)
            run.optimizer.zero_grad()
            loss = run.loss(step, rank)
            loss.backward()
            hooked = run.flat_grads()
            errors.append(float((hooked - exact).norm() / exact.norm()))
            run.optimizer.step()
            losses.append(loss.item())
            if run.hook is not None:
                traffic.append((run.hook.stats.last_step.bytes_dense, run.hook.stats.last_step.bytes_sent))
        results[name] = {
            "losses": losses,
            "traffic": traffic,
            "errors": errors,
            "final_grads": hooked,
            "final_params": torch.cat([p.detach().reshape(-1) for p in run.module.parameters()]),
            "bucket_sizes": dict(run.bucket_sizes),
            "hook_step": None if run.hook is None else run.hook.step,
            "stats": None if run.hook is None else run.hook.stats,
        }
    return results


def train_steps(run: Run, steps: range, rank: int) -> list[float]:
    losses = []
    for step in steps:
        run.optimizer.zero_grad()
        loss = run.loss(step, rank)
        loss.backward()
        run.optimizer.step()
        losses.append(loss.item())
    return losses


def checkpoint(run: Run) -> dict[str, Any]:
    assert run.hook is not None
    state = {"model": run.module.state_dict(), "optimizer": run.optimizer.state_dict()}
    return {**state, "compression": run.hook.state_dict()}


def resume_original(
    rank: int, world_size: int, compressors: dict[str, Compressor], workdir: str, saved_at: int, steps: int
) -> dict[str, list[float]]:
    """Train `saved_at` steps, save every rank's state through torch.save, train on: the losses after saving."""
    losses = {}
    for name, compressor in compressors.items():
        run = build(compressor, named=name != "powersgd_unnamed")
        train_steps(run, range(saved_at), rank)
        torch.save(checkpoint(run), Path(workdir) / f"{name}-rank{rank}.pt")
        losses[name] = train_steps(run, range(saved_at, saved_at + steps), rank)
    return losses


def resume_restored(
    rank: int,
    world_size: int,
    compressors: dict[str, Compressor],
    workdir: str,
    saved_at: int,
    steps: int,
    restore_compression: bool,
) -> dict[str, list[float]]:
    """In new processes and a new group: restore each rank's own state and train the same steps."""
    losses = {}
    for name, compressor in compressors.items():
        state = torch.load(Path(workdir) / f"{name}-rank{rank}.pt", weights_only=False)
        if not restore_compression:
            state.pop("compression")
        run = build(compressor, state, named=name != "powersgd_unnamed")
        if not restore_compression:
            assert run.hook is not None
            run.hook.step = saved_at  # the schedule position alone, without residuals or Q
        losses[name] = train_steps(run, range(saved_at, saved_at + steps), rank)
    return losses


def nonfinite(
    rank: int, world_size: int, compressors: dict[str, Compressor], steps: int, poison_step: int
) -> dict[str, Any]:
    """Rank 1 gets a NaN input at `poison_step`; a step with non-finite gradients is skipped, as a GradScaler does."""
    results = {}
    for name, compressor in compressors.items():
        run = build(compressor)
        assert run.hook is not None
        messages, ratios, losses = [], [], []
        for step in range(steps):
            run.optimizer.zero_grad()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = run.loss(step, rank, poison=rank == 1 and step == poison_step)
                loss.backward()
            messages.append([str(w.message) for w in caught if w.category.__name__ == "NonFiniteGradientWarning"])
            if torch.isfinite(run.flat_grads()).all():
                run.optimizer.step()
            ratios.append(run.hook.stats.last_step.ratio)
            losses.append(loss.item())
        state = run.hook.compressor.state_dict()
        tensors = [t for key in ("residuals", "q") for t in state.get(key, {}).values()]
        results[name] = {
            "messages": messages,
            "ratios": ratios,
            "losses": losses,
            "state_tensors": len(tensors),
            "state_finite": all(bool(torch.isfinite(t).all()) for t in tensors),
            "nonfinite_buckets": run.hook.stats.total.nonfinite_buckets,
        }
    return results


def accumulate(
    rank: int, world_size: int, compressor: Compressor, optimizer_steps: int, micro_batches: int
) -> dict[str, Any]:
    """Gradient accumulation with `no_sync`: the hook runs on the synchronizing backward only."""
    run = build(compressor)
    assert run.hook is not None
    ratios, calls = [], []
    for step in range(optimizer_steps):
        calls_before = run.hook_calls
        run.optimizer.zero_grad()
        for micro in range(micro_batches):
            sync = micro == micro_batches - 1
            with contextlib.nullcontext() if sync else run.ddp.no_sync():
                (run.loss(step * micro_batches + micro, rank) / micro_batches).backward()
        run.optimizer.step()
        ratios.append(run.hook.stats.last_step.ratio)
        calls.append(run.hook_calls - calls_before)
    return {
        "hook_step": run.hook.step,
        "stats_steps": run.hook.stats.steps,
        "hook_calls_per_step": calls,
        "buckets": len(run.bucket_sizes),
        "ratios": ratios,
    }


class SlowFP16(FP16):
    """FP16 that also burns 20 ms per bucket: a candidate Auto must reject on any link."""

    def compressed_mean(self, buffer: Tensor, layout: BucketLayout, comm: Collectives, step: int) -> Tensor:
        time.sleep(0.02)
        return super().compressed_mean(buffer, layout, comm, step)


def slow_link(bytes_per_second: float) -> Callable[[], None]:
    """Make every all_reduce take its payload's time on a link of this speed; returns the undo."""
    original = dist.all_reduce

    def all_reduce(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        time.sleep(tensor.numel() * tensor.element_size() / bytes_per_second)
        return original(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce

    def undo() -> None:
        dist.all_reduce = original

    return undo


def auto(
    rank: int, world_size: int, compressor: Compressor, steps: int, bytes_per_second: float | None
) -> dict[str, Any]:
    """Train with `Auto` (on a simulated slow link when `bytes_per_second` is set); its decision and traffic."""
    undo = slow_link(bytes_per_second) if bytes_per_second else None
    try:
        run = build(compressor)
        assert run.hook is not None
        ratios = []
        for step in range(steps):
            train_steps(run, range(step, step + 1), rank)
            ratios.append(run.hook.stats.last_step.ratio)
        return {"state": run.hook.compressor.state_dict(), "ratios": ratios}
    finally:
        if undo is not None:
            undo()


def trained_compressors() -> dict[str, Compressor | None]:
    """What `train` compares; "none" is plain DDP without a hook."""
    return {
        "none": None,
        "dense": Dense(),
        "fp16": FP16(),
        "bf16": BF16(),
        "int8": Int8(),
        "topk": TopK(ratio=0.05),
        "topk_no_ef": TopK(ratio=0.05, error_feedback=False),
        "powersgd": PowerSGD(rank=4, start_step=POWERSGD_START),
        "powersgd_no_ef": PowerSGD(rank=4, start_step=POWERSGD_START, error_feedback=False),
    }


def resumed_compressors() -> dict[str, Compressor]:
    """What the resume test saves and restores; "powersgd_unnamed" names parameters without the module."""
    return {
        "powersgd": PowerSGD(rank=4, start_step=2),
        "powersgd_unnamed": PowerSGD(rank=4, start_step=2),
        "int8": Int8(),
        "topk": TopK(ratio=0.05),
        "auto": Auto(PowerSGD(rank=4, start_step=2), probe_steps=3),
    }


def session(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """Every scenario in one process group (starting processes is the slow part), checkpoints into `workdir`."""
    return {
        "train": train(rank, world_size, trained_compressors(), STEPS),
        "nonfinite": nonfinite(
            rank,
            world_size,
            {"int8": Int8(), "topk": TopK(ratio=0.05), "powersgd": PowerSGD(rank=4, start_step=2)},
            steps=8,
            poison_step=POISON_STEP,
        ),
        "accumulate": accumulate(rank, world_size, PowerSGD(rank=4, start_step=2), optimizer_steps=4, micro_batches=3),
        "auto_slow_link": auto(
            rank, world_size, Auto(PowerSGD(rank=4, start_step=2), probe_steps=3), steps=10, bytes_per_second=2e6
        ),
        "auto_slow_candidate": auto(rank, world_size, Auto(SlowFP16(), probe_steps=3), steps=10, bytes_per_second=None),
        "resume": resume_original(rank, world_size, resumed_compressors(), workdir, SAVED_AT, RESUMED_STEPS),
    }


def restored(rank: int, world_size: int, workdir: str, checkpoints: str) -> dict[str, Any]:
    """In new processes: resume from the session's checkpoints with and without the compression state."""
    return {
        "with_state": resume_restored(
            rank, world_size, resumed_compressors(), checkpoints, SAVED_AT, RESUMED_STEPS, restore_compression=True
        ),
        "without_state": resume_restored(
            rank, world_size, resumed_compressors(), checkpoints, SAVED_AT, RESUMED_STEPS, restore_compression=False
        ),
    }
