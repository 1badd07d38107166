"""The overlapped hook (futures returned before the bucket is averaged) against the synchronous one, on 2 gloo ranks.

Both hooks train the same model from the same start on the same batches, side by side in one process group; the
overlapped one must give bit-identical gradients, bytes per step and compressor state, step after step, through
PowerSGD's dense warm-up, a non-finite bucket and a resume. No timings are asserted: whether the future was still
pending when the hook returned is made certain by holding rank 1 back, not by a clock.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_eff.compression import BF16, FP16, CompressionHook, Compressor, Dense, PowerSGD
from lightning_eff.compression.transport import BucketLayout, Collectives
from tests.compression.distributed import run_ranks

pytestmark = pytest.mark.slow

STEPS = 8
POWERSGD_START = 2
POISON_STEP = 4
BUCKET_CAP_MB = 0.01  # about one weight matrix per bucket: several chained buckets per step


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 32))


def batch(step: int, rank: int, poison: bool = False) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 48, generator=generator)
    if poison:
        x[0, 0] = math.nan
    return x, torch.randn(16, 32, generator=generator)


def compressors() -> dict[str, Callable[[], Compressor]]:
    return {
        "dense": Dense,
        "fp16": FP16,
        "bf16": BF16,
        "powersgd": lambda: PowerSGD(rank=2, start_step=POWERSGD_START),
        "powersgd_no_warm_start": lambda: PowerSGD(rank=2, start_step=POWERSGD_START, warm_start=False),
    }


class Model:
    """One DDP model on this rank with a `CompressionHook`, its optimizer, and per-hook-call records."""

    def __init__(self, compressor: Compressor, overlap: bool, state: dict[str, Any] | None = None) -> None:
        self.module = make_model()
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1, momentum=0.9)
        if state is not None:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.ddp = DistributedDataParallel(self.module, bucket_cap_mb=BUCKET_CAP_MB)
        self.hook = CompressionHook(compressor, module=self.module, overlap=overlap)
        if state is not None:
            self.hook.load_state_dict(state["compression"])
        self.pending_at_return: list[bool] = []  # per non-last bucket: its future was not done when the hook returned
        self.on_first_return: Callable[[], None] | None = None
        hook = self.hook

        def recording_hook(group, bucket):  # no annotations: under `from __future__`, DDP would reject them
            future = hook(group, bucket)
            if not bucket.is_last():
                self.pending_at_return.append(not future.done())
            if self.on_first_return is not None and bucket.index() == 0:
                self.on_first_return()
            return future

        self.ddp.register_comm_hook(None, recording_hook)

    def step(self, step: int, rank: int, poison: bool = False) -> dict[str, Any]:
        """One training step; this rank's averaged gradients, the step's traffic and the compressor's state."""
        self.optimizer.zero_grad()
        x, y = batch(step, rank, poison)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nn.functional.mse_loss(self.ddp(x), y).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in self.module.parameters()])
        if torch.isfinite(grads).all():
            self.optimizer.step()
        last = self.hook.stats.last_step
        return {
            "grads": grads.clone(),
            "bytes": (last.bytes_dense, last.bytes_sent, last.nonfinite_buckets),
            "seconds": (last.compress_seconds, last.communicate_seconds),
            "warnings": [str(w.message) for w in caught if w.category.__name__ == "NonFiniteGradientWarning"],
            "state": self.hook.compressor.state_dict(),
            "hook_step": self.hook.step,
        }

    def checkpoint(self) -> dict[str, Any]:
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {**state, "compression": self.hook.state_dict()}


def side_by_side(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """Every compressor trained by the overlapped and the synchronous hook, alternating step by step."""
    results: dict[str, Any] = {}
    for name, factory in compressors().items():
        overlapped, synchronous = Model(factory(), overlap=True), Model(factory(), overlap=False)
        rows: dict[str, list[dict[str, Any]]] = {"overlap": [], "sync": []}
        for step in range(STEPS):
            poison = name.startswith("powersgd") and rank == 1 and step == POISON_STEP
            rows["overlap"].append(overlapped.step(step, rank, poison))
            rows["sync"].append(synchronous.step(step, rank, poison))
        results[name] = {**rows, "pending": overlapped.pending_at_return}
    return results


def resume(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """PowerSGD overlapped: save at step 4 (residuals, Q, stats), restore into a new model, train on."""
    original = Model(PowerSGD(rank=2, start_step=POWERSGD_START), overlap=True)
    for step in range(4):
        original.step(step, rank)
    saved = copy.deepcopy(original.checkpoint())  # state_dict() holds the live tensors
    continued = [original.step(step, rank) for step in range(4, STEPS)]
    restored = Model(PowerSGD(rank=2, start_step=POWERSGD_START), overlap=True, state=saved)
    resumed = [restored.step(step, rank) for step in range(4, STEPS)]
    return {"continued": continued, "resumed": resumed}


def held_back(rank: int, world_size: int, workdir: str) -> list[list[bool]]:
    """From step 2 on, rank 1 starts each backward only once rank 0's hook has returned for bucket 0, so rank 0's
    first bucket cannot have been averaged by then: its future must be pending (else the hook waited for it).
    Steps 0 and 1 are not held back: step 0 has a single bucket, which is the last (the hook waits for it), and
    step 1's forward broadcasts DDP's rebuilt buckets, which needs both ranks."""
    model = Model(PowerSGD(rank=2, start_step=POWERSGD_START), overlap=True)
    flags: list[list[bool]] = []
    for step in range(6):
        signal = Path(workdir) / f"returned-{step}"
        model.pending_at_return.clear()
        if step >= 2 and rank == 0:
            model.on_first_return = signal.touch
        if step >= 2 and rank == 1:
            deadline = time.monotonic() + 30
            while not signal.exists() and time.monotonic() < deadline:
                time.sleep(0.001)
        model.step(step, rank)
        model.on_first_return = None
        flags.append(list(model.pending_at_return))
    return flags[2:]


class FailsInSecondStage(PowerSGD):
    """PowerSGD whose second stage (after the P allreduce) raises, on every rank alike."""

    def _project_q(self, work: Any, first: Tensor, comm: Collectives) -> Tensor | None:
        raise RuntimeError("second stage failed")


def failing(rank: int, world_size: int, workdir: str) -> str:
    """An error inside a chained stage ends the backward with that error on every rank, not in a hang. (DDP
    cannot go on after a failed backward, so this is the scenario's only step.)"""
    model = Model(FailsInSecondStage(rank=2, start_step=0, error_feedback=False), overlap=True)
    try:
        model.step(0, rank)
    except RuntimeError as error:
        return str(error)
    return "no error"


def bits(tensor: Tensor) -> Tensor:
    """The float32 tensor's bit patterns, so NaNs compare equal when they are the same NaN."""
    return tensor.view(torch.int32)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(run_all, tmp_path_factory.mktemp("overlap"), timeout=120)


def run_all(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    """Every scenario in one process group (starting processes is the slow part)."""
    return {
        scenario.__name__: scenario(rank, world_size, workdir)
        for scenario in (side_by_side, resume, held_back, failing)
    }


@pytest.mark.parametrize("name", list(compressors()))
def test_overlapped_hook_gives_bit_identical_gradients_bytes_and_state(
    session: list[dict[str, Any]], name: str
) -> None:
    for rank_results in session:
        rows = rank_results["side_by_side"][name]
        for step, (overlapped, synchronous) in enumerate(zip(rows["overlap"], rows["sync"], strict=True)):
            assert torch.equal(bits(overlapped["grads"]), bits(synchronous["grads"])), (name, step)
            assert overlapped["bytes"] == synchronous["bytes"], (name, step)
            assert overlapped["hook_step"] == synchronous["hook_step"] == step + 1
            assert overlapped["warnings"] == synchronous["warnings"], (name, step)
            assert overlapped["state"].keys() == synchronous["state"].keys()
            for key in ("residuals", "q"):
                saved, expected = overlapped["state"].get(key, {}), synchronous["state"].get(key, {})
                assert saved.keys() == expected.keys(), (name, step, key)
                assert all(torch.equal(saved[k], expected[k]) for k in saved), (name, step, key)
            assert all(seconds >= 0 for seconds in overlapped["seconds"])
    last = [rank_results["side_by_side"][name]["overlap"][-1]["grads"] for rank_results in session]
    assert torch.equal(last[0], last[1])


def test_powersgd_state_is_kept_and_compresses_past_its_warm_up(session: list[dict[str, Any]]) -> None:
    rows = session[0]["side_by_side"]["powersgd"]["overlap"]
    dense, sent, _ = rows[-1]["bytes"]
    assert sent < 0.2 * dense
    assert [b[1] == b[0] for b in (row["bytes"] for row in rows[:POWERSGD_START])] == [True] * POWERSGD_START
    assert rows[-1]["state"]["residuals"] and rows[-1]["state"]["q"]


@pytest.mark.parametrize("name", ["powersgd", "powersgd_no_warm_start"])
def test_a_nonfinite_bucket_goes_dense_with_one_warning_and_leaves_the_state_alone(
    session: list[dict[str, Any]], name: str
) -> None:
    for rank_results in session:
        rows = rank_results["side_by_side"][name]["overlap"]
        assert [bool(row["warnings"]) for row in rows] == [step == POISON_STEP for step in range(STEPS)]
        assert len(rows[POISON_STEP]["warnings"]) == 1 and "inf/NaN" in rows[POISON_STEP]["warnings"][0]
        dense, sent, nonfinite = rows[POISON_STEP]["bytes"]
        assert nonfinite >= 1 and sent > dense  # the flag plus a dense bucket
        before, after = rows[POISON_STEP - 1]["state"], rows[POISON_STEP]["state"]
        for key in ("residuals", "q"):  # the NaN reaches every gradient, so every bucket went dense
            assert after[key].keys() == before[key].keys()
            assert all(torch.equal(after[key][k], before[key][k]) for k in after[key]), key
        assert all(torch.isfinite(row["grads"]).all() for row in rows[POISON_STEP + 1 :])


def test_resume_of_an_overlapped_run_is_exact(session: list[dict[str, Any]]) -> None:
    for rank_results in session:
        continued, resumed = rank_results["resume"]["continued"], rank_results["resume"]["resumed"]
        for step, (original, restored) in enumerate(zip(continued, resumed, strict=True)):
            assert torch.equal(original["grads"], restored["grads"])
            assert original["hook_step"] == restored["hook_step"]
            if step > 0:  # a new DDP's first step sends one bucket, so one non-finite flag fewer than later steps
                assert original["bytes"] == restored["bytes"]


def test_the_hook_returns_before_the_bucket_is_averaged(session: list[dict[str, Any]]) -> None:
    pending = session[0]["held_back"]  # per step: whether each non-last bucket's future was pending at return
    assert len(pending) == 4 and all(len(flags) >= 2 and flags[0] for flags in pending)


def test_an_error_in_a_chained_stage_ends_the_backward_on_every_rank(session: list[dict[str, Any]]) -> None:
    assert ["second stage failed" in rank_results["failing"] for rank_results in session] == [True, True]


def test_single_process_async_form_equals_the_synchronous_one() -> None:
    layout = BucketLayout(("w", "b"), (torch.Size([32, 16]), torch.Size([16])))
    generator = torch.Generator().manual_seed(3)
    for factory in compressors().values():
        synchronous, overlapped = factory(), factory()
        for step in range(4):
            buffer = torch.randn(32 * 16 + 16, generator=generator)
            expected = synchronous.allreduce_mean(buffer.clone(), layout, Collectives(), step)
            comm = Collectives()
            result = overlapped.allreduce_mean_async(buffer.clone(), layout, comm, step)
            assert result.done() and torch.equal(result.wait(), expected)
            assert comm.bytes_sent > 0


def test_async_powersgd_sends_a_nonfinite_bucket_dense_after_the_flag_and_keeps_its_state() -> None:
    layout = BucketLayout(("w", "b"), (torch.Size([32, 16]), torch.Size([16])))
    compressor = PowerSGD(rank=2, start_step=2)
    for step in range(3):
        compressor.allreduce_mean(torch.randn(32 * 16 + 16), layout, Collectives(), step)
    before = compressor.state_dict()
    bad = torch.randn(32 * 16 + 16)
    bad[5] = float("nan")
    comm = Collectives()
    result = compressor.allreduce_mean_async(bad.clone(), layout, comm, 3).wait()
    assert comm.nonfinite and torch.equal(bits(result), bits(bad))  # the dense average of one rank
    assert comm.bytes_sent == 4 + 4 * (32 * 16 + 16)  # the flag, then the bucket dense
    after = compressor.state_dict()
    for key in ("residuals", "q"):
        assert all(torch.equal(after[key][k], before[key][k]) for k in before[key])
    comm = Collectives()
    compressor.allreduce_mean_async(torch.randn(32 * 16 + 16), layout, comm, 4).wait()
    assert not comm.nonfinite and comm.bytes_sent == 4 + 4 * (16 + 32 * 2) + 4 * 16 * 2  # flag; dense + P; Q
