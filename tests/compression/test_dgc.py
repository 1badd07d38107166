"""`TopK` with Deep Gradient Compression: the warm-up, the sampled threshold, momentum correction, clipping, and on
2 gloo ranks: bytes after the warm-up and a resume that continues bit for bit."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_eff.compression import BucketLayout, Collectives, CompressionHook, TopK
from lightning_eff.compression.dgc import MIN_SAMPLED_NUMEL, sampled_topk, warmup_densities, warmup_density
from lightning_eff.validation import ConfigError
from tests.compression.distributed import run_ranks


def averaged(compressor: TopK, tensors: dict[str, Tensor], step: int = 0) -> tuple[Tensor, Collectives]:
    """One bucket holding `tensors`, averaged over a world of one; the result and the collectives' counts."""
    layout = BucketLayout(tuple(tensors), tuple(t.shape for t in tensors.values()))
    comm = Collectives()
    buffer = torch.cat([t.reshape(-1) for t in tensors.values()])
    return compressor.allreduce_mean(buffer, layout, comm, step).clone(), comm


def test_warmup_densities_fall_by_four_per_stage_then_hold_the_ratio() -> None:
    assert warmup_densities(0.001) == [0.25, 0.0625, 0.015625, 0.00390625]  # the paper's 75% ... 99.6% sparsity
    assert warmup_densities(0.25) == [] and warmup_densities(0.3) == []
    densities = [warmup_density(step, 0.001, warmup_steps=40) for step in range(45)]
    assert densities == [0.25] * 10 + [0.0625] * 10 + [0.015625] * 10 + [0.00390625] * 10 + [0.001] * 5
    assert TopK(ratio=0.01, warmup_steps=9).density(0) == 0.25 and TopK(ratio=0.01, warmup_steps=9).density(9) == 0.01
    assert TopK(ratio=0.01).density(0) == 0.01  # no warm-up by default: the plain top-k of before


def test_warmup_sends_each_stages_share() -> None:
    compressor = TopK(ratio=0.001, warmup_steps=4)  # 4 stages, one step each
    weight = torch.randn(4000)
    sent = [averaged(compressor, {"w": weight}, step)[1].bytes_sent for step in range(6)]
    assert sent == [8 * k + 4 for k in (1000, 250, 63, 16, 4, 4)]  # value + int32 index per element; the flag


def test_momentum_correction_accumulates_velocity_and_masks_what_was_sent() -> None:
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(50, generator=generator) for _ in range(4)]
    compressor = TopK(ratio=0.1, momentum=0.9)
    u, v = torch.zeros(50), torch.zeros(50)
    for step, grad in enumerate(grads):
        u = 0.9 * u + grad
        v = v + u
        sent = torch.zeros(50)
        chosen = v.abs().topk(5).indices
        sent[chosen] = v[chosen]
        v[chosen], u[chosen] = 0, 0
        out, _ = averaged(compressor, {"w": grad}, step)
        torch.testing.assert_close(out, sent)
        torch.testing.assert_close(compressor.residuals.tensors["w"], v)
        torch.testing.assert_close(compressor.velocities.tensors["w"], u)


def test_without_masking_the_velocity_keeps_what_was_sent() -> None:
    compressor = TopK(ratio=0.1, momentum=0.5, momentum_masking=False)
    grad = torch.randn(30)
    averaged(compressor, {"w": grad}, 0)
    averaged(compressor, {"w": grad}, 1)
    torch.testing.assert_close(compressor.velocities.tensors["w"], 1.5 * grad)


def test_local_clipping_scales_each_parameter_to_its_norm() -> None:
    big, small = torch.full((100,), 1.0), torch.full((4,), 0.1)  # norms 10 and 0.2
    out, _ = averaged(TopK(ratio=1, clip_norm=1.0, error_feedback=False), {"big": big, "small": small})
    torch.testing.assert_close(out[:100].norm(), torch.tensor(1.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(out[100:], small)  # within the norm: untouched


def test_compact_sends_four_bytes_per_element_and_keeps_the_rounding_in_the_residual() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = [
        {"w": torch.randn(300, 200, generator=generator), "b": torch.randn(7, generator=generator)} for _ in range(3)
    ]
    compressor = TopK(ratio=0.01, compact=True)
    sent = torch.zeros(60007)
    for step, tensors in enumerate(inputs):
        out, comm = averaged(compressor, tensors, step)
        assert comm.bytes_sent == 4 * (600 + 1) + 4  # bfloat16 value + 16-bit index; the flag
        nonzero = out != 0
        assert int(nonzero.sum()) == 601 and torch.equal(out[nonzero], out[nonzero].to(torch.bfloat16).float())
        sent += out
    residual = torch.cat([compressor.residuals.tensors[name].reshape(-1) for name in ("w", "b")])
    total = sum(torch.cat([t["w"].reshape(-1), t["b"]]) for t in inputs)
    torch.testing.assert_close(sent + residual, total)
    big = torch.randn(2**16 + 10)  # two blocks for 16-bit indices: 65536 elements (656 sent) and 10 (1 sent)
    out, comm = averaged(TopK(ratio=0.01, compact=True, error_feedback=False), {"big": big})
    assert comm.bytes_sent == 4 * 657 + 4
    top = big[: 2**16].abs().topk(656).indices
    assert torch.equal(out[: 2**16][top], big[: 2**16][top].to(torch.bfloat16).float())
    assert (
        int((out[2**16 :] != 0).sum()) == 1 and out[2**16 :].abs().max() == big[2**16 :].abs().max().bfloat16().float()
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(2 * MIN_SAMPLED_NUMEL, generator=g),
        lambda g: torch.distributions.StudentT(1.5).sample((MIN_SAMPLED_NUMEL,)),  # heavy tails
        lambda g: torch.randn(MIN_SAMPLED_NUMEL, generator=g) * (torch.rand(MIN_SAMPLED_NUMEL, generator=g) < 0.1),
    ],
    ids=["normal", "heavy_tailed", "mostly_zero"],
)
@pytest.mark.parametrize("density", [0.01, 0.001])
def test_sampled_threshold_selects_exactly_the_top_k_from_a_bounded_number_of_candidates(
    make: Callable[[torch.Generator], Tensor], density: float
) -> None:
    torch.manual_seed(0)
    importance = make(torch.Generator().manual_seed(1)).abs()
    k = math.ceil(density * importance.numel())
    selection = sampled_topk(importance, k, 0.01, torch.Generator().manual_seed(2))
    assert not selection.exact and selection.indices.numel() == k
    exact = importance.topk(k).indices
    assert torch.equal(selection.indices.sort().values, exact.sort().values)
    assert k <= selection.candidates <= 3 * k  # aimed at 1.25 k from a 1% sample
    again = sampled_topk(importance, k, 0.01, torch.Generator().manual_seed(2))
    assert torch.equal(again.indices, selection.indices) and again.candidates == selection.candidates


def test_sampled_threshold_candidates_average_near_the_aim() -> None:
    importance = torch.randn(MIN_SAMPLED_NUMEL, generator=torch.Generator().manual_seed(0)).abs()
    k = math.ceil(0.01 * importance.numel())
    ratios = [sampled_topk(importance, k, 0.01, torch.Generator().manual_seed(s)).candidates / k for s in range(8)]
    assert 1.0 <= sum(ratios) / len(ratios) <= 1.6


def test_small_tensors_and_no_sampling_use_an_exact_top_k() -> None:
    importance = torch.rand(MIN_SAMPLED_NUMEL - 1)
    assert sampled_topk(importance, 100, 0.01, torch.Generator()).exact
    a = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 0.05, 0.01, 0.02, 0.03])
    for compressor in (TopK(ratio=0.2, error_feedback=False), TopK(ratio=0.2, error_feedback=False, sample_ratio=None)):
        out, _ = averaged(compressor, {"a": a})
        assert torch.equal(out, torch.tensor([0, -5.0, 0, 3.0, 0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TopK(momentum=1.0), "momentum=1.0: must be in [0, 1)"),
        (lambda: TopK(momentum=-0.1), "momentum=-0.1: must be in [0, 1)"),
        (lambda: TopK(momentum="0.9"), "momentum=0.9: must be in [0, 1) (a number, not a string)"),  # type: ignore[arg-type]
        (lambda: TopK(momentum=0.9, error_feedback=False), "momentum=0.9: needs error_feedback=true"),
        (lambda: TopK(momentum_masking="no"), "momentum_masking=no: must be true or false"),  # type: ignore[arg-type]
        (lambda: TopK(clip_norm=0), "clip_norm=0: must be > 0, or null for no clipping"),
        (lambda: TopK(warmup_steps=-1), "warmup_steps=-1: must be >= 0"),
        (lambda: TopK(warmup_steps=2.5), "warmup_steps=2.5: must be an integer"),  # type: ignore[arg-type]
        (lambda: TopK(sample_ratio=0), "sample_ratio=0: must be in (0, 1], or null for an exact top-k"),
        (lambda: TopK(sample_ratio=2), "sample_ratio=2: must be in (0, 1]"),
        (lambda: TopK(seed=-1), "seed=-1: must be >= 0"),
        (lambda: TopK(compact=1), "compact=1: must be true or false"),  # type: ignore[arg-type]
    ],
)
def test_bad_dgc_arguments_are_refused_with_the_argument_named(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_state_holds_residuals_and_velocities_and_older_states_load() -> None:
    compressor = TopK(ratio=0.1, momentum=0.9)
    averaged(compressor, {"w": torch.randn(20)})
    buffer = io.BytesIO()
    torch.save(compressor.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"name", "residuals", "velocities"} and set(state["velocities"]) == {"w"}
    older = {"name": "topk", "residuals": state["residuals"]}  # saved before momentum existed
    restored = TopK(ratio=0.1)
    restored.load_state_dict(older)
    assert restored.velocities.tensors == {}


# --- on 2 gloo ranks -----------------------------------------------------------------------------------------

WARMUP_STEPS, SAVED_AT, STEPS = 4, 6, 12


def dgc() -> TopK:
    """Every DGC piece on, the sampled threshold included (the first layer's weight has 2**20 elements)."""
    return TopK(ratio=0.001, momentum=0.9, clip_norm=1.0, warmup_steps=WARMUP_STEPS, sample_ratio=0.01)


def build(
    state: dict[str, Any] | None = None,
) -> tuple[nn.Module, DistributedDataParallel, torch.optim.SGD, CompressionHook]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 8))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)  # no momentum: DGC's is in the compressor
    hook = CompressionHook(dgc(), module=module)
    if state is not None:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        hook.load_state_dict(state["compression"])
    ddp = DistributedDataParallel(module, bucket_cap_mb=1)  # two buckets once DDP has rebuilt them
    ddp.register_comm_hook(None, hook)
    return module, ddp, optimizer, hook


def train(
    ddp: DistributedDataParallel, optimizer: torch.optim.SGD, hook: CompressionHook, steps: range, rank: int
) -> tuple[list[float], list[tuple[int, int]]]:
    """Losses, and (dense, sent) bytes per step."""
    losses, traffic = [], []
    for step in steps:
        generator = torch.Generator().manual_seed(1000 * rank + step)
        x = torch.randn(16, 1024, generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), x[:, :8].sin())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        traffic.append((hook.stats.last_step.bytes_dense, hook.stats.last_step.bytes_sent))
    return losses, traffic


def uninterrupted_and_resumed(rank: int, world_size: int, workdir: str) -> dict[str, Any]:
    module, ddp, optimizer, hook = build()
    losses, traffic = train(ddp, optimizer, hook, range(STEPS), rank)
    final = [p.detach().clone() for p in module.parameters()]

    module, ddp, optimizer, hook = build()
    first, _ = train(ddp, optimizer, hook, range(SAVED_AT), rank)
    path = Path(workdir) / f"rank{rank}-state.pt"
    torch.save(
        {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "compression": hook.state_dict()}, path
    )
    module, ddp, optimizer, hook = build(torch.load(path, weights_only=False))  # a fresh model, compressor, hook
    then, _ = train(ddp, optimizer, hook, range(SAVED_AT, STEPS), rank)
    resumed = [p.detach().clone() for p in module.parameters()]
    return {"losses": losses, "resumed_losses": first + then, "final": final, "resumed": resumed, "traffic": traffic}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(uninterrupted_and_resumed, tmp_path_factory.mktemp("dgc"), timeout=120)


def test_a_resumed_run_continues_bit_for_bit(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert rank["resumed_losses"] == rank["losses"]
        assert all(torch.equal(a, b) for a, b in zip(rank["final"], rank["resumed"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["final"], ranks[1]["final"], strict=True))


def test_bytes_follow_the_warmup_then_are_over_100x_fewer_than_dense(ranks: list[dict[str, Any]]) -> None:
    numels = [1024 * 1024, 1024, 8 * 1024, 8]
    for step, (dense, sent) in enumerate(ranks[0]["traffic"]):
        density = warmup_density(step, 0.001, WARMUP_STEPS)
        flags = sent - 8 * sum(max(1, math.ceil(density * n)) for n in numels)
        assert dense == 4 * sum(numels) and flags in (4, 8)  # one finite flag per bucket (one or two buckets)
        if step >= WARMUP_STEPS:
            assert dense / sent >= 100
