"""The compressors' arithmetic, validation and state in one process (collectives are the identity at world size 1)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_eff.compression import (
    BF16,
    COMPRESSORS,
    FP16,
    Auto,
    BucketLayout,
    Collectives,
    CompressionStats,
    Compressor,
    Dense,
    Int8,
    PowerSGD,
    TopK,
    Traffic,
)
from lightning_eff.compression.int8 import row_runs
from lightning_eff.validation import ConfigError


def averaged(compressor: Compressor, tensors: dict[str, Tensor], step: int = 0) -> tuple[Tensor, Collectives]:
    """One bucket holding `tensors`, averaged over a world of one; the result and the collectives' counts."""
    layout = BucketLayout(tuple(tensors), tuple(t.shape for t in tensors.values()))
    comm = Collectives()
    buffer = torch.cat([t.reshape(-1) for t in tensors.values()])
    return compressor.allreduce_mean(buffer, layout, comm, step).clone(), comm


def low_rank(rows: int, cols: int, rank: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)


def test_powersgd_reproduces_a_matrix_of_its_rank_and_sends_vectors_dense() -> None:
    matrix, bias = low_rank(96, 48, rank=3), torch.randn(48)
    out, comm = averaged(PowerSGD(rank=3, start_step=0, error_feedback=False), {"w": matrix, "b": bias})
    torch.testing.assert_close(out[: matrix.numel()].view_as(matrix), matrix, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[matrix.numel() :], bias)
    assert comm.bytes_sent == 4 * (3 * (96 + 48) + 48) + 4  # P, Q, the bias, the finite flag


def test_powersgd_approximation_of_a_higher_rank_matrix_is_inexact_and_error_feedback_keeps_the_rest() -> None:
    matrix = low_rank(96, 48, rank=12)
    compressor = PowerSGD(rank=3, start_step=2)
    out, _ = averaged(compressor, {"w": matrix}, step=2)
    residual = compressor.residuals.tensors["w"]
    assert (out.view_as(matrix) - matrix).norm() > 0.1 * matrix.norm()
    torch.testing.assert_close(out.view_as(matrix) + residual, matrix)


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation() -> None:
    matrix = low_rank(64, 32, rank=8, seed=1)
    compressor = PowerSGD(rank=2, start_step=0, error_feedback=False)
    for step in range(30):  # the same gradient every step: warm-started Q is a power iteration
        out, _ = averaged(compressor, {"w": matrix}, step)
    u, s, vh = torch.linalg.svd(matrix)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    torch.testing.assert_close(out.view_as(matrix), best, atol=1e-3, rtol=1e-3)


def test_powersgd_sends_dense_before_start_step_and_where_low_rank_would_not_save() -> None:
    _, comm = averaged(PowerSGD(rank=4, start_step=5), {"w": low_rank(96, 48, 12)}, step=4)
    assert comm.bytes_sent == 4 * 96 * 48
    compressor = PowerSGD(rank=4, start_step=2)
    assert not compressor.compresses((8, 8))  # 4 x (8 + 8) = 64, not fewer than 64
    assert compressor.compresses((16, 3, 3, 3))  # a conv kernel is a 16 x 27 matrix
    square = torch.randn(8, 8)
    out, comm = averaged(compressor, {"w": square}, step=2)
    assert torch.equal(out.view(8, 8), square) and comm.bytes_sent == 4 * 64 + 4  # dense, plus the finite flag


def test_int8_rounding_is_unbiased_and_within_one_level() -> None:
    values = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    compressor = Int8(error_feedback=False)
    outs = torch.stack([averaged(compressor, {"x": values}, step)[0] for step in range(400)])
    level = values[:1024].abs().max() / 127  # the first chunk's step size at world size 1
    assert (outs[:, :1024] - values[:1024]).abs().max() <= level * 1.0001
    single_step_error = (outs[0] - values).abs().mean()
    assert (outs.mean(0) - values).abs().mean() < 0.1 * single_step_error
    assert not torch.equal(outs[0], outs[1])  # fresh noise every step


def test_int8_with_error_feedback_rounds_to_nearest_and_carries_the_error_forward() -> None:
    values = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    compressor = Int8()  # error feedback: rounding=auto is nearest, no noise
    assert not compressor.stochastic and Int8(error_feedback=False).stochastic
    first = averaged(compressor, {"x": values}, 0)[0]
    level = values[:1024].abs().max() / 127
    assert (first[:1024] - values[:1024]).abs().max() <= level * 0.5001  # nearest: within half a level
    # the rounding error goes into the next step: over steps, the sum sent tracks the sum of the gradients
    outs = torch.stack([first] + [averaged(compressor, {"x": values}, step)[0] for step in range(1, 200)])
    assert (outs.sum(0) - 200 * values).abs().max() <= level * 1.0001  # only the last residual is missing
    assert not torch.equal(outs[0], outs[1])  # the carried error changes what the next step rounds
    forced = Int8(rounding="stochastic")
    assert forced.stochastic and not torch.equal(averaged(forced, {"x": values}, 0)[0], first)


def test_int8_sends_a_byte_per_element_plus_a_scale_per_chunk() -> None:
    _, comm = averaged(Int8(), {"a": torch.randn(3000), "b": torch.randn(10)})
    assert comm.bytes_sent == 3010 + 4 * (3 + 1) + 4  # int8 payload, scales, finite flag


def test_int8_views_a_bucket_as_rows_that_tile_it_and_never_straddle_a_chunk() -> None:
    gpt = [32 * 1024, 128, 128, 128, 512 * 128, 512, 128 * 512, 128]  # embedding, layer norms, biases, linears
    runs, chunk_rows = row_runs(gpt, 1024)
    assert runs == ((0, sum(gpt) // 128, 128),)  # one run of 128-wide rows: one operation per pass over the bucket
    assert chunk_rows == [8] * 32 + [1] * 3 + [8] * 64 + [4] + [8] * 64 + [1]  # 1024-chunks and each short tail
    odd = [3000, 7, 2048, 100]
    runs, chunk_rows = row_runs(odd, 1024)
    assert runs == ((0, 375, 8), (3000, 7, 1), (3007, 2, 1024), (5055, 25, 4))  # 7 and 100 share no 32: new runs
    assert sum(rows * width for _, rows, width in runs) == sum(odd)
    widths = [width for _, rows, width in runs for _ in range(rows)]
    chunk_lengths, row = [], 0
    for rows in chunk_rows:
        chunk_lengths.append(sum(widths[row : row + rows]))
        row += rows
    assert chunk_lengths == [1024, 1024, 952, 7, 1024, 1024, 100]  # per parameter: whole chunks, then its tail


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_int8_gives_each_parameter_the_same_result_in_any_bucket(rounding: str) -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = {"w": 3000, "b1": 128, "b2": 128, "v": 2048, "c": 100, "d": 1024}  # whole chunks, tails, equal neighbours
    scales = {"w": 1.0, "b1": 50.0, "b2": 0.01, "v": 3.0, "c": 1e-3, "d": 10.0}  # merged chunks would share a scale
    steps = [{n: torch.randn(k, generator=generator) * scales[n] for n, k in sizes.items()} for _ in range(3)]
    together, alone = Int8(rounding=rounding), Int8(rounding=rounding)
    first: list[Tensor] = []
    for step, tensors in enumerate(steps):
        bucket = averaged(together, tensors, step)[0].split(list(sizes.values()))
        first = first or list(bucket)
        for name, out in zip(sizes, bucket, strict=True):
            assert torch.equal(out, averaged(alone, {name: tensors[name]}, step)[0]), (name, step)
    for name in sizes:
        assert torch.equal(together.residuals.tensors[name], alone.residuals.tensors[name])
    small, within = steps[0]["b2"], 0.5 if rounding == "nearest" else 1.0  # of a level (no residual at step 0)
    assert (first[2] - small).abs().max() <= small.abs().max() / 127 * within * 1.0001  # its own scale, not b1's


def test_topk_sends_each_parameters_largest_magnitudes() -> None:
    a = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 0.05, 0.01, 0.02, 0.03])
    b = torch.tensor([1.0, -2.0])
    out, comm = averaged(TopK(ratio=0.2, error_feedback=False), {"a": a, "b": b})
    expected = torch.tensor([0, -5.0, 0, 3.0, 0, 0, 0, 0, 0, 0, 0, -2.0])
    assert torch.equal(out, expected)
    assert comm.bytes_sent == 3 * (4 + 4) + 4  # 2 of a, 1 of b (at least one each): value + int32 index; flag


@pytest.mark.parametrize("make", [lambda: TopK(ratio=0.1), lambda: Int8(), lambda: PowerSGD(rank=1, start_step=2)])
def test_error_feedback_loses_nothing_over_steps(make: Callable[[], Compressor]) -> None:
    compressor = make()
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(20, 10, generator=generator) for _ in range(6)]
    sent = sum(averaged(compressor, {"w": x}, step)[0] for step, x in enumerate(inputs))
    residual = compressor.residuals.tensors["w"].reshape(-1)  # type: ignore[attr-defined]
    torch.testing.assert_close(sent + residual, sum(x.reshape(-1) for x in inputs))


@pytest.mark.parametrize("compressor", [FP16(), BF16()])
def test_casts_halve_the_bytes_and_keep_the_dtype(compressor: Compressor) -> None:
    values = torch.randn(100)
    out, comm = averaged(compressor, {"x": values})
    assert out.dtype == torch.float32 and comm.bytes_sent == 200
    torch.testing.assert_close(out, values, atol=0.02, rtol=0.01)
    _, comm = averaged(compressor, {"x": values.to(compressor.dtype)})  # type: ignore[attr-defined]
    assert comm.bytes_sent == 200  # already narrow: sent as it is


def test_non_finite_bucket_goes_dense_and_leaves_residuals_alone() -> None:
    compressor = TopK(ratio=0.1)
    averaged(compressor, {"w": torch.randn(50)})
    before = compressor.residuals.tensors["w"].clone()
    bad = torch.randn(50)
    bad[3] = float("inf")
    out, comm = averaged(compressor, {"w": bad}, step=1)
    assert comm.nonfinite and comm.bytes_sent == 4 + 50 * 4
    assert torch.equal(out, bad) and torch.equal(compressor.residuals.tensors["w"], before)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PowerSGD(rank=0), "rank=0: must be >= 1"),
        (lambda: PowerSGD(rank=2.5), "rank=2.5: must be an integer"),  # type: ignore[arg-type]
        (lambda: PowerSGD(start_step=-1), "start_step=-1: must be >= 0"),
        (lambda: PowerSGD(start_step=1, error_feedback=True), "start_step=1: must be >= 2 with error_feedback=true"),
        (lambda: TopK(ratio=0), "ratio=0: must be in (0, 1]"),
        (lambda: TopK(ratio=1.5), "ratio=1.5: must be in (0, 1]"),
        (lambda: TopK(ratio="0.1"), "ratio=0.1: must be in (0, 1]"),  # type: ignore[arg-type]
        (lambda: Int8(error_feedback="yes"), "error_feedback=yes: must be true or false"),  # type: ignore[arg-type]
        (lambda: Int8(rounding="up"), "rounding=up: must be one of auto, nearest, stochastic"),
        (lambda: Auto(probe_steps=0), "probe_steps=0: must be >= 1"),
        (lambda: Auto(margin=1.0), "margin=1.0: must be in [0, 1)"),
        (lambda: Auto(candidate="powersgd"), "candidate=powersgd: must be a compressor other than Auto"),  # type: ignore[arg-type]
        (lambda: Auto(candidate=Auto()), "candidate=Auto(candidate=PowerSGD(rank=4"),
    ],
)
def test_bad_arguments_are_refused_with_the_argument_named(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_allowed_edge_values() -> None:
    assert PowerSGD(start_step=0, error_feedback=False).start_step == 0
    assert PowerSGD(start_step=2).start_step == 2
    assert TopK(ratio=1).ratio == 1
    assert Auto(probe_steps=1, margin=0).probe_steps == 1


def saved_and_loaded(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make", [lambda: PowerSGD(rank=2, start_step=2), lambda: TopK(ratio=0.1), lambda: Int8()])
def test_state_round_trip_continues_exactly(make: Callable[[], Compressor]) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = [
        {"w": torch.randn(30, 20, generator=generator), "b": torch.randn(20, generator=generator)} for _ in range(6)
    ]
    original = make()
    for step in range(4):
        averaged(original, inputs[step], step)
    state = saved_and_loaded(original.state_dict())  # plain tensors, loadable with weights_only=True
    assert all(t.device.type == "cpu" for key in ("residuals", "q") for t in state.get(key, {}).values())
    restored = make()
    restored.load_state_dict(state)
    for step in (4, 5):
        assert torch.equal(averaged(original, inputs[step], step)[0], averaged(restored, inputs[step], step)[0])


def test_state_of_another_compressor_or_another_model_is_refused() -> None:
    topk = TopK()
    averaged(topk, {"w": torch.randn(10)})
    with pytest.raises(ValueError, match="saved by 'topk', this compressor is 'int8'"):
        Int8().load_state_dict(topk.state_dict())
    other = TopK()
    other.load_state_dict(topk.state_dict())
    with pytest.raises(ValueError, match="'w' has shape"):
        averaged(other, {"w": torch.randn(12)})


def test_auto_probes_after_the_candidates_warm_up_and_skips_step_zero() -> None:
    assert (Auto(PowerSGD(start_step=100), probe_steps=20).probe_start, Auto(probe_steps=20).decide_step) == (80, 120)
    assert (Auto(TopK(), probe_steps=5).probe_start, Auto(TopK(), probe_steps=5).decide_step) == (1, 11)


@pytest.mark.parametrize(("candidate_seconds", "decision"), [(0.90, "candidate"), (0.96, "dense")])
def test_auto_keeps_the_candidate_only_when_it_beats_dense_by_the_margin(
    candidate_seconds: float, decision: str
) -> None:
    auto = Auto(TopK(ratio=0.1), probe_steps=2, margin=0.05)
    auto.dense_seconds, auto.candidate_seconds = [1.0, 1.0], [candidate_seconds, candidate_seconds]
    _, comm = averaged(auto, {"w": torch.randn(100)}, step=auto.decide_step)
    assert auto.decision == decision
    assert auto.measured_seconds == {"dense": 1.0, "candidate": candidate_seconds}
    restored = Auto(TopK(ratio=0.1), probe_steps=2)
    restored.load_state_dict(saved_and_loaded(auto.state_dict()))
    assert restored.decision == decision
    expected_bytes = 8 * 10 + 4 if decision == "candidate" else 400
    assert comm.bytes_sent == 16 + expected_bytes  # the agreed medians (2 float64), then the winner's payload


def test_auto_times_dense_then_the_candidate() -> None:
    auto = Auto(TopK(ratio=0.1), probe_steps=2)
    sent = [averaged(auto, {"w": torch.randn(100)}, step)[1].bytes_sent for step in range(6)]
    assert sent[:5] == [400, 400, 400, 84, 84]  # step 0 untimed, 1-2 dense, 3-4 top-k (80 bytes + flag)
    assert len(auto.dense_seconds) == len(auto.candidate_seconds) == 2
    assert sent[5] == 16 + {"dense": 400, "candidate": 84}[auto.decision]


def test_stats_per_step_and_cumulative() -> None:
    stats = CompressionStats()
    stats.record_bucket(Traffic(bytes_dense=100, bytes_sent=30, compress_seconds=0.1))
    stats.record_bucket(Traffic(bytes_dense=100, bytes_sent=20, communicate_seconds=0.2))
    stats.end_step()
    stats.record_bucket(Traffic(bytes_dense=200, bytes_sent=100))
    stats.end_step()
    assert stats.steps == 2 and stats.last_step.ratio == 0.5 and stats.total.ratio == 150 / 400
    assert stats.total.compress_seconds == 0.1 and stats.total.communicate_seconds == 0.2
    logged = stats.as_dict()
    assert logged["step/bytes_sent"] == 100 and logged["total/ratio"] == 150 / 400
    restored = CompressionStats()
    restored.load_state_dict(saved_and_loaded(stats.state_dict()))
    assert restored == stats
    assert Traffic().ratio == 1.0


def test_registry_names_every_compressor() -> None:
    assert set(COMPRESSORS) == {"dense", "fp16", "bf16", "powersgd", "topk", "int8", "auto"}
    assert all(cls.name == name for name, cls in COMPRESSORS.items())
    assert isinstance(COMPRESSORS["dense"](), Dense)


def test_stats_remember_the_first_compressed_step_across_a_checkpoint() -> None:
    stats = CompressionStats()
    for sent in (8, 8, 2, 8):  # dense warm-up, then compressed, then a dense (e.g. non-finite) step
        stats.record_bucket(Traffic(bytes_dense=8, bytes_sent=sent))
        stats.end_step()
    assert stats.first_compressed_step == 2
    restored = CompressionStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.first_compressed_step == 2 and restored.steps == 4
