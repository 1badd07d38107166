"""KnowledgeDistillation under FSDP2: one 2-process gloo launch of `tests.distillation.fsdp_worker` (about 45 s)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader

from lightning_eff import KnowledgeDistillation
from lightning_eff.distillation import PROJECTIONS
from tests.distillation import fsdp_worker
from tests.workers import run_worker


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("fsdp")
    result = run_worker(fsdp_worker, [str(out)], cwd=out, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)], out


def test_student_sharded_teacher_whole_loss_decreasing(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    for result in ranks[0]:
        full = result["full"]
        assert full["student_sharded"] and not full["teacher_sharded"]
        assert full["steps"] == 8 and len(full["losses"]) == 8  # distillation/loss logged every step
        assert full["projected"] == {"blocks.1": (32, 48)}
        # the same 2 batches each epoch: the last epoch's loss is well below the first's
        assert sum(full["losses"][-2:]) < 0.85 * sum(full["losses"][:2])
        assert full["losses"][-1] == pytest.approx(full["last_loss"])
    report = ranks[0][0]["report"]
    assert report["student_parameters"] == sum(w.numel() for k, w in ranks[0][0]["full"]["weights"].items()
                                               if not k.startswith(PROJECTIONS))  # fmt: skip
    assert report["projection_parameters"] == 32 * 48 + 48 and report["steps"] == 8


def test_exact_resume_from_the_sharded_checkpoint(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    results, out = ranks
    for result in results:
        full, resumed = result["full"], result["resumed"]
        assert resumed["losses"] == full["losses"][4:]
        assert resumed["steps"] == 8 and resumed["last_loss"] == full["last_loss"]
        assert full["weights"].keys() == resumed["weights"].keys()
        for name, weight in full["weights"].items():
            assert torch.equal(weight, resumed["weights"][name]), name
    # the callback's state is in rank 0's meta.pt of the checkpoint directory
    meta = torch.load(next((out / "ckpt").glob("epoch=1-*")) / "meta.pt", weights_only=False)
    state = meta["callbacks"]["KnowledgeDistillation"]
    assert state["steps"] == 4 and state["last_loss"] == pytest.approx(results[0]["full"]["losses"][3])
    assert state["teacher_fingerprint"]["parameters"] == results[0]["report"]["teacher_parameters"]


def test_stripped_copy_exports_a_plain_student(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    for result in ranks[0]:
        export = result["export"]
        assert export["class"] == "TinyGPT" and not export["sharded"]
        assert not export["has_projections"] and export["model_still_has_projections"]
        assert not any(key.startswith(PROJECTIONS) for key in export["keys"])
        torch.testing.assert_close(export["output"], export["sharded_output"], rtol=0, atol=1e-5)


def test_test_set_agreement_covers_both_ranks(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    results = ranks[0]
    assert results[0]["test_agreement"] == results[1]["test_agreement"]  # reduced over the ranks
    assert results[0]["test_agreement"] == pytest.approx(results[0]["recomputed_agreement"], abs=1e-6)
    assert results[0]["report"]["test_agreement"] == results[0]["test_agreement"]
    assert results[0]["report"]["agreement"] == "argmax"


def test_initial_teacher_is_the_unsharded_student_before_training(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    for result in ranks[0]:
        initial = result["initial"]
        assert not initial["teacher_sharded"] and not initial["teacher_trainable"] and initial["steps"] == 8
        assert initial["teacher"].keys() == initial["before"].keys()
        for name, weight in initial["before"].items():
            assert torch.equal(initial["teacher"][name], weight), name
        assert any(not torch.equal(initial["after"][k], w) for k, w in initial["before"].items())  # the student moved
        # taken from a student already sharded (a later fit): gathered, whole, without the projections
        again, weights = result["initial_of_sharded"], result["full"]["weights"]
        assert not again["sharded"]
        assert set(again["state"]) == {k for k in weights if not k.startswith(PROJECTIONS)}
        for name, weight in again["state"].items():
            assert torch.equal(weight, weights[name]), name


def test_a_sharded_teacher_is_refused(ranks: tuple[list[dict[str, Any]], Path]) -> None:
    for result in ranks[0]:
        assert "teacher=FSDPTinyGPT: is sharded (DTensor parameters): pass an unsharded teacher" in (
            result.get("sharded_teacher_error") or ""
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy (FSDP1) needs a CUDA device")
def test_distillation_under_fsdp1_trains_with_the_teacher_outside(tmp_path: Path) -> None:
    """FSDP1 wraps the student; the teacher stays outside it, whole: the distillation term is added and logged."""
    L.seed_everything(0, verbose=False)
    distill = KnowledgeDistillation(fsdp_worker.teacher(), loss="kl", weight=1.0)
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=FSDPStrategy(), max_steps=3, callbacks=[distill],
                        logger=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(fsdp_worker.student(), DataLoader(fsdp_worker.RankBatches(), batch_size=None))
    assert trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["distillation/loss"]))
