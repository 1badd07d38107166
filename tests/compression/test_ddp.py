"""Every compressor under real DDP on 2 gloo processes: bytes, identical gradients, convergence, NaN, resume, Auto.

All scenarios share one process group (`scenarios.session`), because starting processes costs more than the
training; the resume test restores in a second pair of fresh processes and a new group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.compression import scenarios
from tests.compression.distributed import run_ranks

pytestmark = pytest.mark.slow

FLAG_BYTES = 4  # the float32 "all finite?" flag a stateful compressor allreduces per bucket


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    workdir = tmp_path_factory.mktemp("compression-session")
    return run_ranks(scenarios.session, workdir, timeout=300), workdir


@pytest.fixture(scope="module")
def trained(session: tuple[list[dict[str, Any]], Path]) -> list[dict[str, Any]]:
    return [rank_results["train"] for rank_results in session[0]]


def last5(losses: list[float]) -> float:
    return sum(losses[-5:]) / 5


def expected_bytes_sent(name: str, bucket_sizes: dict[int, int]) -> int:
    """Bytes one rank sends per step for the model's two-bucket layout, worked out from the scheme's definition."""
    shapes = [(p.shape, p.numel()) for p in scenarios.make_model().parameters()]
    if name in ("dense",):
        return 4 * sum(bucket_sizes.values())
    if name in ("fp16", "bf16"):
        return 2 * sum(bucket_sizes.values())
    flags = FLAG_BYTES * len(bucket_sizes)
    if name == "int8":  # one byte per element plus a float32 scale per 1024 elements of each parameter
        return sum(n + 4 * math.ceil(n / 1024) for _, n in shapes) + flags
    if name.startswith("topk"):  # float32 value + int32 index for 5% of each parameter's elements
        return sum(8 * math.ceil(0.05 * n) for _, n in shapes) + flags
    if name.startswith("powersgd"):  # rank 4: P (rows x 4) and Q (cols x 4) per matrix, vectors dense
        elements = 0
        for shape, n in shapes:
            low_rank = 4 * (shape[0] + n // shape[0]) if len(shape) == 2 else n
            elements += min(low_rank, n)
        return 4 * elements + flags
    raise AssertionError(name)


HOOKED = ["dense", "fp16", "bf16", "int8", "topk", "topk_no_ef", "powersgd", "powersgd_no_ef"]


@pytest.mark.parametrize("name", HOOKED)
def test_hook_ran_every_step_and_sent_the_bytes_its_scheme_defines(trained: list[dict[str, Any]], name: str) -> None:
    for rank_results in trained:
        result = rank_results[name]
        assert result["hook_step"] == scenarios.STEPS
        assert result["stats"].steps == scenarios.STEPS
        bytes_dense, bytes_sent = result["traffic"][-1]
        assert bytes_dense == 4 * sum(p.numel() for p in scenarios.make_model().parameters())
        assert bytes_sent == expected_bytes_sent(name, result["bucket_sizes"])
        assert result["stats"].total.bytes_sent == sum(sent for _, sent in result["traffic"])


def test_measured_ratios(trained: list[dict[str, Any]]) -> None:
    ratios = {name: trained[0][name]["stats"].last_step.ratio for name in HOOKED}
    assert ratios["dense"] == 1.0
    assert ratios["fp16"] == ratios["bf16"] == 0.5
    assert ratios["int8"] == pytest.approx(0.251, abs=5e-4)
    assert ratios["topk"] == pytest.approx(0.1, abs=1e-3)
    assert ratios["powersgd"] == pytest.approx(0.0871, abs=1e-4)


def test_powersgd_is_dense_before_start_step_then_compresses_past_it_without_deadlocking_on_gloo(
    trained: list[dict[str, Any]],
) -> None:
    # torch's own powerSGD_hook hangs on gloo at the first compressed step; the session's timeout would catch ours.
    result = trained[0]["powersgd"]
    start = scenarios.POWERSGD_START
    assert all(sent == dense for dense, sent in result["traffic"][:start])
    assert all(sent < 0.1 * dense for dense, sent in result["traffic"][start:])
    assert result["errors"][:start] == [0.0] * start  # exactly the dense average before start_step
    assert min(result["errors"][start:]) > 0.1
    assert result["hook_step"] == scenarios.STEPS > start


@pytest.mark.parametrize("name", ["none", *HOOKED])
def test_gradients_and_weights_are_identical_on_both_ranks(trained: list[dict[str, Any]], name: str) -> None:
    assert torch.equal(trained[0][name]["final_grads"], trained[1][name]["final_grads"])
    assert torch.equal(trained[0][name]["final_params"], trained[1][name]["final_params"])


def test_gradients_differ_from_the_exact_average_by_what_each_scheme_loses(trained: list[dict[str, Any]]) -> None:
    worst = {name: max(trained[0][name]["errors"]) for name in ["none", *HOOKED]}
    assert worst["none"] == worst["dense"] == 0.0
    assert 0 < worst["fp16"] < 1e-3
    assert worst["fp16"] < worst["bf16"] < 1e-2
    assert worst["bf16"] < worst["int8"] < 0.1
    assert min(trained[0]["topk"]["errors"]) > 0.1


def test_training_converges_and_error_feedback_keeps_compressed_runs_near_uncompressed(
    trained: list[dict[str, Any]],
) -> None:
    results = trained[0]
    plain = last5(results["none"]["losses"])
    for name in HOOKED:
        assert last5(results[name]["losses"]) < 0.75 * results[name]["losses"][0], name
    assert results["dense"]["losses"] == results["none"]["losses"]
    for name in ("fp16", "bf16", "int8"):
        assert last5(results[name]["losses"]) == pytest.approx(plain, rel=0.02), name
    for name in ("topk", "powersgd"):
        with_feedback = last5(results[name]["losses"])
        without = last5(results[f"{name}_no_ef"]["losses"])
        assert with_feedback < 1.5 * plain, name
        assert with_feedback - plain < 0.5 * (without - plain), name


@pytest.mark.parametrize("name", ["int8", "topk", "powersgd"])
def test_a_nan_on_one_rank_goes_dense_with_a_warning_on_every_rank_and_leaves_state_finite(
    session: tuple[list[dict[str, Any]], Path], name: str
) -> None:
    step = scenarios.POISON_STEP
    for rank_results in session[0]:
        result = rank_results["nonfinite"][name]
        assert [bool(m) for m in result["messages"]] == [s == step for s in range(len(result["messages"]))]
        assert "inf/NaN" in result["messages"][step][0] and name in result["messages"][step][0]
        assert result["ratios"][step] > 1.0 > max(result["ratios"][step + 1 :])  # dense (plus flags), then compressed
        assert result["nonfinite_buckets"] >= 1
        assert result["state_tensors"] > 0 and result["state_finite"]
        assert all(math.isfinite(loss) for loss in result["losses"][step + 1 :])


def test_gradient_accumulation_counts_optimizer_steps_not_micro_batches(
    session: tuple[list[dict[str, Any]], Path],
) -> None:
    for rank_results in session[0]:
        result = rank_results["accumulate"]  # 4 optimizer steps of 3 micro-batches, PowerSGD from step 2
        assert result["hook_step"] == result["stats_steps"] == 4
        assert all(1 <= calls <= result["buckets"] for calls in result["hook_calls_per_step"])
        assert result["ratios"][:2] == [1.0, 1.0] and max(result["ratios"][2:]) < 0.1


def test_auto_keeps_powersgd_on_a_slow_link(session: tuple[list[dict[str, Any]], Path]) -> None:
    states = [rank_results["auto_slow_link"]["state"] for rank_results in session[0]]
    assert [s["decision"] for s in states] == ["candidate", "candidate"]
    assert states[0]["measured_seconds"] == states[1]["measured_seconds"]  # agreed across ranks
    ratios = session[0][0]["auto_slow_link"]["ratios"]  # probes: dense steps 1-3, PowerSGD 4-6; decided at 7
    assert ratios[:4] == [1.0] * 4 and max(ratios[4:]) < 0.1


def test_auto_drops_a_candidate_that_costs_more_than_it_saves(session: tuple[list[dict[str, Any]], Path]) -> None:
    states = [rank_results["auto_slow_candidate"]["state"] for rank_results in session[0]]
    assert [s["decision"] for s in states] == ["dense", "dense"]
    measured = states[0]["measured_seconds"]
    assert measured["candidate"] > measured["dense"]
    ratios = session[0][0]["auto_slow_candidate"]["ratios"]
    assert ratios[4:7] == [0.5] * 3 and ratios[8:] == [1.0, 1.0]


def test_resume_in_fresh_processes_continues_with_identical_losses(
    session: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    original = [rank_results["resume"] for rank_results in session[0]]
    resumed = run_ranks(scenarios.restored, tmp_path, timeout=300, checkpoints=str(session[1]))
    for rank in range(2):
        for name, losses in original[rank].items():
            assert resumed[rank]["with_state"][name] == pytest.approx(losses, abs=1e-6, rel=0), name
        for name in ("powersgd", "powersgd_unnamed", "int8", "topk"):  # so the state is what makes the difference
            without_state = torch.tensor(resumed[rank]["without_state"][name])
            assert (without_state - torch.tensor(original[rank][name])).abs().max() > 1e-6, name
