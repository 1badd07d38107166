"""GradualPruning in a real Trainer: sparsity reached, strict load, exact resume, accumulation, logging, DDP."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_eff import GradualPruning
from lightning_eff.tasks import DigitsDataModule, DigitsMLP, TextDataModule, TinyGPT
from lightning_eff.validation import ConfigError
from tests.pruning import ddp_worker
from tests.workers import run_worker

QUIET: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}


def fit(
    callback: GradualPruning, model: L.LightningModule | None = None, seed: int = 0, **trainer_kwargs: Any
) -> tuple[L.LightningModule, L.Trainer]:
    L.seed_everything(seed, verbose=False)
    model = model or DigitsMLP(hidden_sizes=[64, 64])
    datamodule = DigitsDataModule() if isinstance(model, DigitsMLP) else TextDataModule(seq_len=32, max_bytes=40_000)
    kwargs = {"logger": False, "enable_checkpointing": False, **QUIET, **trainer_kwargs}
    trainer = L.Trainer(callbacks=[callback], **kwargs)
    trainer.fit(model, datamodule=datamodule)
    return model, trainer


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_global_scope_reaches_target_within_half_a_point_with_exact_zeros() -> None:
    callback = GradualPruning(target_sparsity=0.9, update_every=10)
    model, _ = fit(callback, max_steps=80)
    weights = linear_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert abs(zeros - 0.9) <= 0.005
    assert callback.sparsity == pytest.approx(zeros)
    assert set(callback.layer_sparsity) == set(weights)
    assert callback.history[-1]["step"] == 60  # end_step=None -> 75% of 80 steps


def test_layer_scope_reaches_target_exactly_per_tensor() -> None:
    callback = GradualPruning(target_sparsity=0.8, scope="layer", update_every=5, end_step=40)
    model, _ = fit(callback, max_steps=60)
    for name, weight in linear_weights(model).items():
        assert int((weight == 0).sum()) == round(0.8 * weight.numel()), name


def test_pruned_model_loads_strictly_into_a_plain_model_and_has_no_hooks() -> None:
    model, _ = fit(GradualPruning(target_sparsity=0.5, update_every=10), max_steps=30)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert not any("weight_orig" in key or "weight_mask" in key for key in model.state_dict())
    plain = DigitsMLP(hidden_sizes=[64, 64])
    plain.load_state_dict(model.state_dict(), strict=True)
    images = torch.rand(4, 1, 8, 8)
    assert torch.equal(plain(images), model(images))


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    callback = GradualPruning(target_sparsity=0.6, update_every=5, end_step=20)
    _, trainer = fit(callback, max_steps=30, accumulate_grad_batches=2)
    assert trainer.global_step == 30
    steps = [entry["step"] for entry in callback.history]
    assert steps == [5, 10, 15, 20]  # mask updates happen at optimizer steps, not batches
    assert callback.sparsity == pytest.approx(0.6, abs=0.005)


def test_max_epochs_sets_end_step_from_the_run_length() -> None:
    callback = GradualPruning(target_sparsity=0.5, update_every=5)
    fit(callback, max_epochs=2)  # 2 x 20 optimizer steps
    assert callback.schedule.end_step == 30
    assert callback.sparsity == pytest.approx(0.5, abs=0.005)


def test_several_parameter_groups_and_the_small_gpt() -> None:
    model = TinyGPT(n_layer=1, n_head=2, d_model=32, seq_len=32, warmup_steps=1)
    assert len(model.configure_optimizers()["optimizer"].param_groups) == 2
    callback = GradualPruning(target_sparsity=0.7, update_every=5, end_step=20)
    fit(callback, model=model, max_steps=25)
    assert callback.sparsity == pytest.approx(0.7, abs=0.005)
    assert "blocks.0.attn.qkv.weight" in callback.layer_sparsity and "head.weight" in callback.layer_sparsity


def test_n_m_run_ends_with_the_pattern_everywhere() -> None:
    callback = GradualPruning(
        target_sparsity=0.5, granularity="n:m", pattern="2:4", scope="layer", update_every=5, end_step=20
    )
    model, _ = fit(callback, max_steps=25)
    for name, weight in linear_weights(model).items():
        if name in callback.layer_sparsity:
            assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(dim=2) >= 2).all(), name
    assert set(callback.layer_sparsity) == {"net.1.weight", "net.4.weight", "net.7.weight"}


def test_channel_pruning_then_shrink_gives_the_same_outputs_with_fewer_parameters() -> None:
    callback = GradualPruning(target_sparsity=0.5, granularity="channels", scope="layer", update_every=5, end_step=20)
    model, _ = fit(callback, max_steps=25)
    assert callback.plan is not None  # the classifier head keeps its classes: its rows reach the output
    assert [g.name for g in callback.plan.groups] == ["net.1.weight:0", "net.4.weight:0"]
    assert all(share == 0.5 for share in callback.group_sparsity.values())
    small, summary = callback.shrink(model.eval())
    assert set(summary) == {"net.1", "net.4", "net.7"}
    images = torch.rand(16, 1, 8, 8)
    assert torch.allclose(small(images), model(images), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())


def _checkpointed_run(tmp_path: Path, epochs: int, ckpt_path: str | None = None) -> tuple[DigitsMLP, GradualPruning]:
    callback = GradualPruning(target_sparsity=0.9, update_every=10, end_step=100)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    L.seed_everything(0, verbose=False)
    model = DigitsMLP(hidden_sizes=[64, 64])
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback, saver], logger=False, **QUIET)
    trainer.fit(model, datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return model, callback


def test_resume_mid_schedule_ends_with_the_same_masks_as_an_uninterrupted_run(tmp_path: Path) -> None:
    full_model, full = _checkpointed_run(tmp_path / "full", epochs=6)
    checkpoint = tmp_path / "full" / "epoch=1.ckpt"  # step 40: mid-schedule (end_step=100)
    state = torch.load(checkpoint, weights_only=False)
    saved = next(value for key, value in state["callbacks"].items() if key.startswith("GradualPruning"))
    assert 0 < saved["mask_sparsity"] < 0.9 and saved["masks"]
    resumed_model, resumed = _checkpointed_run(tmp_path / "resumed", epochs=6, ckpt_path=str(checkpoint))
    assert [e["step"] for e in resumed.history] == [e["step"] for e in full.history]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a == 0, b == 0), name  # identical masks
        assert torch.allclose(a, b, atol=1e-6), name
    assert resumed.sparsity == pytest.approx(0.9, abs=0.005)


def test_logs_sparsity_to_the_trainer_logger(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.5, update_every=5, end_step=20)
    fit(callback, max_steps=25, logger=CSVLogger(tmp_path, name="", version=""))
    with (tmp_path / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("pruning/sparsity")]
    assert [int(row["step"]) for row in rows] == [5, 10, 15, 20]
    assert float(rows[-1]["pruning/target_sparsity"]) == pytest.approx(0.5)
    assert float(rows[-1]["pruning/layer/net.1.weight"]) > 0


def test_report_section_has_a_layer_table_and_a_plot(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.5, update_every=5, end_step=20)
    _, trainer = fit(callback, max_steps=25)
    section = callback.report_section(trainer, tmp_path)
    assert section.summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert [row["layer"] for row in section.rows] == ["net.1.weight", "net.4.weight", "net.7.weight"]
    assert (tmp_path / section.figures[0]).stat().st_size > 10_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_sparsity": 1.5}, "target_sparsity=1.5: must be in [0, 1)"),
        (
            {"target_sparsity": 0.5, "initial_sparsity": 0.6},
            "initial_sparsity=0.6: must be in [0, target_sparsity=0.5]",
        ),
        ({"start_step": 50, "end_step": 50}, "end_step=50: must be > start_step=50"),
        ({"granularity": "n:m"}, "pattern=None: is required for granularity=n:m"),
        ({"granularity": "n:m", "pattern": "4:2", "target_sparsity": 0.5}, "pattern=4:2: need 0 < N < M"),
        ({"granularity": "n:m", "pattern": "2:4", "target_sparsity": 0.3}, "target_sparsity=0.3: must be >= 0.5"),
        ({"pattern": "2:4"}, "pattern=2:4: is only used with granularity=n:m"),
        ({"scope": "model"}, "scope=model: must be one of global, layer"),
        ({"schedule": "square"}, "schedule=square: must be one of cubic, linear, exponential, one_shot"),
    ],
)
def test_bad_arguments_are_refused_with_the_key(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        GradualPruning(**kwargs)
    assert str(caught.value).startswith(message)


def test_include_and_exclude_must_match_and_errors_list_the_layers() -> None:
    model = DigitsMLP(hidden_sizes=[64, 64])
    with pytest.raises(
        ConfigError, match=r"include=encoder\.\*: matches no prunable layer; layers: net.1, net.4, net.7"
    ):
        GradualPruning(include=["encoder.*"]).check_model(model)
    with pytest.raises(ConfigError, match="exclude=head"):
        GradualPruning(exclude=["head"]).check_model(model)
    targets = GradualPruning(exclude=["net.7"]).check_model(model)
    assert [t.module for t in targets] == ["net.1", "net.4"]
    with pytest.raises(ConfigError, match="cannot be pruned n:m with M=8: input width 60 is not a multiple of M=8"):
        GradualPruning(granularity="n:m", pattern="6:8", target_sparsity=0.8, include=["net.*"]).check_model(
            DigitsMLP(hidden_sizes=[60])
        )


@pytest.mark.slow
def test_masks_are_identical_on_every_ddp_rank(tmp_path: Path) -> None:
    result = run_worker(ddp_worker, [str(tmp_path / "out")], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = (tmp_path / "out.rank0").read_text().split()
    rank1 = (tmp_path / "out.rank1").read_text().split()
    assert rank0 == rank1  # mask checksum, sparsity, update count and weights agree
    assert float(rank0[1]) == pytest.approx(0.8, abs=0.005) and rank0[2] == "3"
