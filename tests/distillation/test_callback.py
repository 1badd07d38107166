"""KnowledgeDistillation on zoo models: it trains the student toward the teacher and leaves the teacher alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_eff import GradualPruning, QuantizationAwareTraining
from lightning_eff.distillation import PROJECTIONS, KnowledgeDistillation
from lightning_eff.loss_terms import LossContributor
from lightning_eff.quantization import FakeQuantizedLinear
from lightning_eff.quantization.prepare import FAKE_QUANTIZED
from lightning_eff.report import ReportContributor
from tests.distillation import ddp_worker
from tests.workers import run_worker
from tests.zoo.models import ZooBatches, ZooTask, build, logits_of

QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


class DistillOnly(ZooTask):
    """A zoo task whose own loss is zero: every weight update comes from the distillation term."""

    def __init__(self, name: str = "gpt2", lr: float = 3e-3, manual: bool = False) -> None:
        super().__init__(name, seed=0, lr=lr)
        self.automatic_optimization = not manual

    def training_step(self, batch: tuple[dict[str, Tensor], Tensor], batch_idx: int) -> Tensor | None:
        zero = logits_of(self.model(**batch[0])).sum() * 0.0
        if self.automatic_optimization:
            return zero
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(zero)
        optimizer.step()
        return None


class Metrics(L.Callback):
    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.history.append({k: float(v) for k, v in trainer.callback_metrics.items()})


class ProjectionsAtStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights = snapshot(getattr(pl_module, PROJECTIONS))


class Shifted(nn.Module):
    """A teacher that predicts the token after the one its GPT-2 predicts, confidently: far from a fresh student."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        self.inner = build("gpt2", seed)

    def forward(self, **inputs: Tensor) -> Tensor:
        return 10 * logits_of(self.inner(**inputs)).roll(1, dims=-1)  # sharpened: random logits are flat


def loader(name: str = "gpt2", count: int = 4) -> DataLoader:
    return DataLoader(ZooBatches(name, count), batch_size=None)


def fit(model: L.LightningModule, callbacks: list[L.Callback], steps: int, **kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(**{**QUIET, "max_steps": steps, "callbacks": callbacks, **kwargs})
    trainer.fit(model, train_dataloaders=loader())
    return trainer


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_distillation_trains_the_student_toward_a_frozen_teacher(tmp_path: Path) -> None:
    student, teacher = DistillOnly(lr=1e-2), Shifted()
    before = snapshot(teacher)
    metrics = Metrics()
    distill = KnowledgeDistillation(teacher, loss="kl", temperature=2.0, weight=1.0, student="model")
    trainer = fit(student, [distill, metrics], steps=20)

    losses = [m["distillation/loss"] for m in metrics.history]
    agreements = [m["distillation/agreement"] for m in metrics.history]
    assert len(losses) == 20 and distill.steps == 20
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])  # the same 4 batches, first and fifth epoch
    assert sum(agreements[-4:]) > sum(agreements[:4]) + 0.6  # the student's argmaxes move to the teacher's
    # the teacher: unchanged, frozen, in eval mode, in no optimizer and not in the module's state_dict
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert set(student.state_dict()) == {f"model.{k}" for k in build("gpt2").state_dict()}
    assert len(student.state_dict()) < len(teacher.state_dict()) + 1
    assert "training_step" not in trainer.strategy.__dict__  # teardown detached the loss term

    assert isinstance(distill, ReportContributor) and isinstance(distill, LossContributor)
    section = distill.report_section(trainer, tmp_path)
    assert section.name == "distillation"
    summary = section.summary
    assert (
        summary["teacher_parameters"] == summary["student_parameters"] == sum(p.numel() for p in teacher.parameters())
    )
    assert summary["final_distillation_loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert summary["last_batch_agreement"] == pytest.approx(agreements[-1])
    assert summary["steps"] == 20 and summary["projection_parameters"] == 0


def test_manual_optimization() -> None:
    student, metrics = DistillOnly(manual=True), Metrics()
    before = snapshot(student)
    distill = KnowledgeDistillation(build("gpt2", seed=1), weight=1.0, student="model")
    fit(student, [distill, metrics], steps=4)
    assert distill.steps == 4 and "distillation/loss" in metrics.history[-1]
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())  # only the term moves it


def test_gradient_accumulation() -> None:
    student = DistillOnly()
    before = snapshot(student)
    distill = KnowledgeDistillation(build("gpt2", seed=1), weight=1.0, student="model")
    trainer = fit(student, [distill], steps=2, accumulate_grad_batches=2)
    assert trainer.global_step == 2 and distill.steps == 4  # one term per micro-batch
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_composes_with_pruning_and_quantization_aware_training() -> None:
    student, teacher = ZooTask("gpt2", seed=0), build("gpt2", seed=1)
    kinds = [type(m).__name__ for m in teacher.modules()]
    pruning = GradualPruning(target_sparsity=0.5, end_step=2, update_every=1)
    qat = QuantizationAwareTraining("int8_dynamic", convert_on_fit_end=False)
    distill = KnowledgeDistillation(teacher, student="model")
    fit(student, [pruning, qat, distill], steps=3)
    assert distill.steps == 3
    student_kinds = {type(m).__name__ for m in student.modules()}
    assert any("FakeQuantized" in kind for kind in student_kinds)
    assert pruning.sparsity == pytest.approx(0.5, abs=0.02)
    assert [type(m).__name__ for m in teacher.modules()] == kinds  # no fake-quantized layer in the teacher
    dense = [p for p in teacher.parameters() if p.dim() == 2]
    assert all(float((p == 0).float().mean()) < 0.01 for p in dense)  # and no pruned weights


def test_teacher_in_bf16() -> None:
    teacher = build("gpt2", seed=1)
    fingerprint = KnowledgeDistillation(copy.deepcopy(teacher)).teacher_fingerprint()
    distill = KnowledgeDistillation(teacher, student="model", teacher_precision="bf16")
    fit(ZooTask("gpt2"), [distill], steps=2)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert distill.last_loss is not None and torch.isfinite(torch.as_tensor(distill.last_loss))
    assert distill.teacher_fingerprint() == fingerprint
    assert KnowledgeDistillation(teacher).teacher_fingerprint() == fingerprint  # the cast teacher: the same one


def test_layers_with_a_wider_teacher_train_a_projection_that_strip_removes() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.zoo.models import SEQ, VOCAB

    torch.manual_seed(1)
    wide = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=48, n_layer=2, n_head=4))
    student = DistillOnly()
    distill = KnowledgeDistillation(
        wide,
        weight=1.0,
        student="model",
        layers={"model.transformer.h.1": "transformer.h.1", "model.transformer.h.0": "transformer.h.0"},
    )
    metrics = Metrics()
    start = ProjectionsAtStart()
    trainer = fit(student, [distill, metrics, start], steps=6)
    projections = getattr(student, PROJECTIONS)
    assert set(projections) == {"model__transformer__h__1", "model__transformer__h__0"}
    assert distill.projected == {"model.transformer.h.1": (32, 48), "model.transformer.h.0": (32, 48)}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in projections.parameters()} <= optimized  # configure_optimizers saw them
    assert all(not torch.equal(v, start.weights[k]) for k, v in projections.state_dict().items())  # they trained
    assert "distillation/layer_loss" in metrics.history[-1]
    assert any(k.startswith(PROJECTIONS) for k in student.state_dict())
    assert KnowledgeDistillation.strip(student) is student
    assert not hasattr(student, PROJECTIONS) and set(student.state_dict()) == {
        f"model.{k}" for k in build("gpt2").state_dict()
    }


def test_layers_of_equal_width_need_no_projection() -> None:
    student, metrics = DistillOnly(), Metrics()
    distill = KnowledgeDistillation(
        build("gpt2", seed=1),
        weight=1.0,
        student="model",
        loss="mse",
        layers={"model.transformer.h.0": "transformer.h.1"},
    )
    fit(student, [distill, metrics], steps=2)
    assert not hasattr(student, PROJECTIONS) and "distillation/layer_loss" in metrics.history[-1]


def test_resume_restores_the_state_and_refuses_another_teacher(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    first = KnowledgeDistillation(build("gpt2", seed=1), student="model")
    fit(ZooTask("gpt2"), [first, checkpoint], steps=3, enable_checkpointing=True)
    last = str(tmp_path / "last.ckpt")

    same = KnowledgeDistillation(build("gpt2", seed=1), student="model")  # an equal teacher, built again
    trainer = L.Trainer(**{**QUIET, "max_steps": 5, "callbacks": [same], "enable_checkpointing": False})
    trainer.fit(ZooTask("gpt2"), train_dataloaders=loader(), ckpt_path=last)
    assert trainer.global_step == 5 and same.steps == 5  # 3 restored + 2

    other = KnowledgeDistillation(build("gpt2", seed=2), student="model")
    trainer = L.Trainer(**{**QUIET, "max_steps": 5, "callbacks": [other]})
    with pytest.raises(ValueError, match=r"distilled from another teacher .the same shapes, other weights"):
        trainer.fit(ZooTask("gpt2"), train_dataloaders=loader(), ckpt_path=last)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "kld"}, "loss=kld: must be one of kl, mse, cosine or a callable"),
        ({"temperature": 0}, "temperature=0: must be > 0"),
        ({"temperature": "2"}, "temperature=2: must be > 0 (a number, not a string)"),
        ({"weight": -0.1}, "weight=-0.1: must be >= 0"),
        ({"student": ""}, "student='': must be a submodule's attribute path"),
        ({"layers": {}}, "layers={}: must be a non-empty mapping"),
        ({"teacher_precision": "fp8"}, "teacher_precision=fp8: must be null or one of bf16"),
        ({"teacher": "gpt2"}, "teacher=gpt2: must be a torch.nn.Module, or 'initial'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as error:
        KnowledgeDistillation(**{"teacher": nn.Linear(2, 2), **kwargs})
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"student": "modle"},
            r"^student=modle: names no module of the LightningModule; modules: model, model\.transformer",
        ),
        (
            {"student": "model", "layers": {"model.transformer.h.9": "transformer.h.0"}},
            r"^layers=model\.transformer\.h\.9: names no module",
        ),
        (
            {"student": "model", "layers": {"model.transformer.h.0": "h.0"}},
            r"^layers=h\.0: names no module of the teacher; modules: transformer,",
        ),
    ],
)
def test_paths_that_name_no_module(kwargs: dict[str, Any], message: str) -> None:
    distill = KnowledgeDistillation(build("gpt2", seed=1), **kwargs)
    with pytest.raises(ValueError, match=message):
        fit(ZooTask("gpt2"), [distill], steps=1)


def test_a_teacher_inside_the_student_is_refused() -> None:
    student = ZooTask("gpt2")
    with pytest.raises(ValueError, match=r"^teacher=GPT2LMHeadModel: shares parameters with the LightningModule"):
        fit(student, [KnowledgeDistillation(student.model, student="model")], steps=1)


def test_a_teacher_with_another_output_shape() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.zoo.models import SEQ

    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=SEQ, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match=r"^teacher=GPT2LMHeadModel: its output shape \(4, 16, 120\) does not match "
                                         r"the student's \(model\) \(4, 16, 96\)"):  # fmt: skip
        fit(ZooTask("gpt2"), [KnowledgeDistillation(teacher, student="model")], steps=1)


def test_a_student_forward_that_is_not_called() -> None:
    with pytest.raises(RuntimeError, match=r"student=None\): the LightningModule's forward was not called in this"):
        fit(ZooTask("gpt2"), [KnowledgeDistillation(build("gpt2", seed=1))], steps=1)


# --- DDP ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_without_find_unused_parameters(tmp_path: Path) -> None:
    result = run_worker(ddp_worker, [str(tmp_path)], cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["projected"] == {"net.0": [6, 12]} and ranks[0]["projections"] == ["net__0"]
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    assert any(k.startswith(PROJECTIONS) for k in ranks[0]["weights"])
    for key, weights in ranks[0]["weights"].items():
        assert weights == pytest.approx(ranks[1]["weights"][key], abs=1e-6), key


def test_resume_loads_the_projections(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 4, (32,)))
    teacher = ddp_worker.mlp(12)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    first = ddp_worker.Student()
    distill = KnowledgeDistillation(teacher, layers={"net.0": "0"})
    trainer = L.Trainer(**{**QUIET, "max_steps": 2, "enable_checkpointing": True, "callbacks": [distill, checkpoint]})
    trainer.fit(first, DataLoader(data, batch_size=8))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert f"{PROJECTIONS}.net__0.weight" in saved

    resumed, start = ddp_worker.Student(), ProjectionsAtStart()
    distill = KnowledgeDistillation(teacher, layers={"net.0": "0"})
    trainer = L.Trainer(**{**QUIET, "max_steps": 3, "callbacks": [distill, start]})
    trainer.fit(resumed, DataLoader(data, batch_size=8), ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(start.weights["net__0.weight"], saved[f"{PROJECTIONS}.net__0.weight"])  # strict load
    assert distill.steps == 3


def test_the_initial_teacher_is_a_frozen_float_copy_of_the_student_before_training() -> None:
    student = ZooTask("llama", seed=0, lr=1e-2)
    initial = snapshot(student.model)
    qat = QuantizationAwareTraining("int8_dynamic")  # swaps the student's layers before distillation's setup
    pruning = GradualPruning(target_sparsity=0.5, update_every=1, end_step=2)
    callback = KnowledgeDistillation("initial", loss="kl", student="model")
    fit(student, [pruning, qat, callback], steps=3)
    teacher = callback.teacher
    assert not any(isinstance(m, FAKE_QUANTIZED) for m in teacher.modules())  # float, though the student is not
    assert any(isinstance(m, FakeQuantizedLinear) for m in student.model.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in initial.items())  # the weights at the start
    name = next(iter(pruning.masks)).removeprefix("model.")
    assert (student.model.get_parameter(name) == 0).any() and not (teacher.get_parameter(name) == 0).any()
