"""QuantizationAwareTraining in a real Trainer: phases, conversion, resume, test after fit, kwargs, pruning."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_eff import GradualPruning, QuantizationAwareTraining
from lightning_eff.quantization import FakeQuantizedLinear, QuantizedLinear, load_quantized
from lightning_eff.quantization.measure import evaluate_test_set
from lightning_eff.tasks import DigitsDataModule, DigitsMLP, TextDataModule, TinyGPT

QUIET: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(callbacks: list[Callback], model: L.LightningModule | None = None, **kwargs: Any) -> tuple[Any, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = model or DigitsMLP(hidden_sizes=[64, 64])
    trainer = L.Trainer(callbacks=callbacks, **{"logger": False, "enable_checkpointing": False, **QUIET, **kwargs})
    trainer.fit(model, datamodule=DigitsDataModule())
    return model, trainer


def test_layers_are_swapped_in_place_with_the_same_parameters_and_the_head_stays_float() -> None:
    model = DigitsMLP(hidden_sizes=[64, 64])
    before = {name: p for name, p in model.named_parameters()}
    callback = QuantizationAwareTraining("int8_dynamic_act_int4_weight")
    fit([callback], model, max_steps=3)
    assert callback.layers == ["net.1", "net.4"]  # net.7, the 10-way head, is the default exclusion
    assert isinstance(model.net[1], FakeQuantizedLinear) and type(model.net[7]) is torch.nn.Linear
    assert {name: p for name, p in model.named_parameters()}.keys() == before.keys()
    assert all(p is before[name] for name, p in model.named_parameters())  # the very same Parameters


def test_float_until_start_step_then_fake_quantized_and_the_change_is_logged(tmp_path: Path) -> None:
    seen: list[bool] = []

    class Phase(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, i: int) -> None:
            seen.append(module.net[1].fake_quantize)

    callback = QuantizationAwareTraining("int8_dynamic", start_step=5)
    # QAT before Phase: its on_train_batch_start switches first, as in any user's callback list
    fit([callback, Phase()], max_steps=10, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1)
    assert seen == [False] * 5 + [True] * 5
    assert callback.phase == "fake_quant" and callback.phase_changed_at == 5
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    logged = [(int(r["step"]), float(r["quantization/fake_quant"])) for r in rows if r.get("quantization/fake_quant")]
    assert logged == [(5, 1.0)]


def test_fake_quantization_changes_training_and_conversion_matches_the_fake_quantized_model() -> None:
    float_losses, qat_losses = Losses(), Losses()
    fit([float_losses], max_steps=20)
    callback = QuantizationAwareTraining("int8_dynamic_act_int4_weight")
    model, _ = fit([callback, qat_losses], max_steps=20)
    assert qat_losses.losses != pytest.approx(float_losses.losses, rel=1e-6)  # rounding is really applied
    converted = callback.quantized_model
    assert converted is not None and isinstance(converted.net[1], QuantizedLinear)
    images = torch.randn(128, 64)
    with torch.no_grad():
        expected, got = model.eval()(images), converted(images)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.98
    assert float((got - expected).norm() / expected.norm()) < 0.02


@pytest.mark.slow
def test_converted_digits_model_keeps_test_accuracy_within_half_a_point(tmp_path: Path) -> None:
    callback = QuantizationAwareTraining("int8_dynamic_act_int4_weight")
    _, trainer = fit([callback], max_epochs=8)
    section = callback.report_section(trainer, tmp_path)
    assert section is not None
    rows = {row["metric"]: row for row in section.rows}
    assert rows["test_acc"]["fake_quantized"] > 0.9
    assert abs(rows["test_acc"]["converted"] - rows["test_acc"]["fake_quantized"]) <= 0.005
    assert section.summary["weight_size_ratio"] <= 1 / 6
    assert section.summary["inference_ms_quantized"] > 0


def test_resume_from_a_qat_checkpoint_continues_the_uninterrupted_run(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    full = Losses()
    fit([QuantizationAwareTraining("int8_dynamic_act_int4_weight", start_step=4), full, saver], max_steps=12,
        enable_checkpointing=True)  # fmt: skip
    resumed_losses, callback = Losses(), QuantizationAwareTraining("int8_dynamic_act_int4_weight", start_step=4)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=[callback, resumed_losses], max_steps=12, logger=False, enable_checkpointing=False,
                        **QUIET)  # fmt: skip
    trainer.fit(DigitsMLP(hidden_sizes=[64, 64]), datamodule=DigitsDataModule(), ckpt_path=tmp_path / "step=6.ckpt")
    assert callback.phase == "fake_quant" and callback.phase_changed_at == 4  # restored, not re-decided at 6
    assert resumed_losses.losses == pytest.approx(full.losses[6:], abs=1e-6)


def test_a_checkpoint_of_another_scheme_is_refused(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, filename="last")
    fit([QuantizationAwareTraining("int8_dynamic"), saver], max_steps=3, enable_checkpointing=True)
    trainer = L.Trainer(callbacks=[QuantizationAwareTraining("int4_weight_only")], max_steps=6, logger=False, **QUIET)
    with pytest.raises(ValueError, match="scheme=int8_dynamic"):
        trainer.fit(DigitsMLP(hidden_sizes=[64, 64]), datamodule=DigitsDataModule(), ckpt_path=tmp_path / "last.ckpt")


def test_trainer_test_with_ckpt_path_after_fit(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=30, filename="last")
    callback = QuantizationAwareTraining("int8_weight_only")
    model, trainer = fit([callback, saver], max_steps=30, enable_checkpointing=True)
    in_memory = trainer.test(model, datamodule=DigitsDataModule(), verbose=False)
    from_checkpoint = trainer.test(model, datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "last.ckpt"),
                                   verbose=False)  # fmt: skip
    assert from_checkpoint == in_memory  # the checkpoint of the last step: same weights, same phase
    assert from_checkpoint[0]["test_acc"] > 0.5
    assert model.net[1].fake_quantize  # tested as trained: fake-quantized


class KeywordMLP(L.LightningModule):
    """forward takes a keyword argument, which must reach it unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 10)
        self.temperatures: list[float] = []

    def forward(self, images: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        self.temperatures.append(temperature)
        return self.head(torch.relu(self.body(images.flatten(1)))) / temperature

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images, temperature=2.0), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_keyword_arguments_to_forward_pass_through(tmp_path: Path) -> None:
    callback = QuantizationAwareTraining("int8_dynamic")
    model, trainer = fit([callback], KeywordMLP(), max_steps=4)
    assert model.temperatures == [2.0] * 4
    assert isinstance(model.body, FakeQuantizedLinear)
    section = callback.report_section(trainer, tmp_path)  # times inference with the captured kwargs
    assert section is not None and section.summary["inference_ms_fp32"] > 0
    assert model.temperatures[-1] == 2.0


def test_export_path_with_a_keyword_forward_is_checked_at_the_first_batch_and_exports(tmp_path: Path) -> None:
    path = tmp_path / "keyword.pt2"
    callback = QuantizationAwareTraining("int8_dynamic", export_path=str(path))
    model, _ = fit([callback], KeywordMLP(), max_steps=4)
    assert callback._export_checked and path.is_file()
    assert model.temperatures == [2.0] * 4  # the check exported a converted copy: the model ran 4 times, no more
    loaded = load_quantized(path)
    images = torch.randn(5, 1, 8, 8)  # another batch size than the traced 64
    assert callback.quantized_model is not None
    with torch.no_grad():
        expected = callback.quantized_model(images, temperature=2.0)
        assert torch.allclose(loaded(images, temperature=2.0), expected, atol=1e-5)


def test_inference_is_timed_on_a_training_batch_not_the_model_summary_example() -> None:
    callback = QuantizationAwareTraining("int8_dynamic")
    fit([callback], max_steps=2, enable_model_summary=True)  # the summary runs forward on example_input_array
    assert callback._example is not None
    (images,), _ = callback._example
    assert images.shape[0] == 64 and images.abs().sum() > 0  # a batch of digits, not 2 zeros


def test_pruning_and_qat_compose_and_pruned_weights_stay_exactly_zero_after_conversion() -> None:
    pruning = GradualPruning(target_sparsity=0.75, update_every=5, end_step=15, scope="layer")
    qat = QuantizationAwareTraining("int8_dynamic_act_int4_weight")
    model, _ = fit([pruning, qat], max_steps=20)
    assert qat.quantized_model is not None
    for name in qat.layers:
        float_weight = model.get_submodule(name).weight
        pruned = float_weight == 0
        assert float(pruned.float().mean()) == pytest.approx(0.75, abs=0.01), name
        converted = qat.quantized_model.get_submodule(name)
        assert (converted.integer_weight()[pruned] == 0).all(), name
        assert (converted.dequantized_weight()[pruned] == 0).all(), name


def test_export_path_writes_a_model_that_loads_without_the_training_code(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    callback = QuantizationAwareTraining("int8_dynamic", export_path=str(path))
    fit([callback], max_steps=4)
    assert path.is_file()
    loaded = load_quantized(path)
    images = torch.randn(7, 1, 8, 8)  # another batch size than the traced one
    assert callback.quantized_model is not None
    with torch.no_grad():
        assert torch.allclose(loaded(images), callback.quantized_model(images), atol=1e-5)
    assert "DigitsMLP" not in type(loaded).__name__


@pytest.mark.slow
def test_converted_gpt_keeps_the_validation_loss_within_one_percent() -> None:
    callback = QuantizationAwareTraining("int8_dynamic_act_int4_weight", start_step=20)
    L.seed_everything(0, verbose=False)
    model = TinyGPT(d_model=64, seq_len=64)
    datamodule = TextDataModule(seq_len=64, max_bytes=200_000)
    trainer = L.Trainer(callbacks=[callback], max_steps=60, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, **QUIET)  # fmt: skip
    trainer.fit(model, datamodule=datamodule)
    assert callback.quantized_model is not None
    fake = evaluate_test_set(model, datamodule, limit_batches=10)["test_loss"]
    converted = evaluate_test_set(callback.quantized_model, datamodule, limit_batches=10)["test_loss"]
    assert fake < 4.0  # it learned something: ln(256) = 5.5 at chance
    assert abs(converted - fake) <= 0.01 * fake
