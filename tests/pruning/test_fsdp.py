"""GradualPruning under FSDP2 (ModelParallelStrategy on CPU, gloo): one 2-process launch (`fsdp_worker`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lightning_eff import GradualPruning
from lightning_eff.tasks import TextDataModule, TinyGPT
from lightning_eff.validation import ConfigError
from tests.pruning import fsdp_worker
from tests.workers import run_worker


def test_pruning_under_fsdp2_matches_ddp_resumes_exactly_and_refuses_channels(tmp_path: Path) -> None:
    result = run_worker(fsdp_worker, [str(tmp_path / "out")], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [dict(line.split(" ", 1) for line in (tmp_path / f"out.rank{r}").read_text().splitlines()) for r in (0, 1)]
    for lines in ranks:
        # the sharded threshold is exact: the same choices as a whole-tensor top-k (random weights, no ties)
        assert lines["selector_equal"] == "40 40"
        assert lines["masks_are_shards"] == "1"  # no rank holds a whole mask
        assert abs(float(lines["global_sparsity"]) - 0.5) <= 0.005  # over the gathered weights
        assert lines["reported_sparsity"] == lines["global_sparsity"]
        assert lines["masks_zero_weights"] == "1"
        # the same seed and data under DDP: bit-equal weights, so the same masks
        assert lines["ddp_masks_equal"] == "1" and float(lines["ddp_weights_max_diff"]) == 0.0
        assert lines["sharded_checkpoint"] == "1"  # a DCP directory, mask shards beside the model
        assert lines["resume_masks_equal"] == "1" and lines["resume_weights_equal"] == "1"
        assert lines["one_file_resume_equal"] == "1"
        assert lines["layer_exact"] == "1" and lines["nm_2_4"] == "1"
        assert lines["gpt2_ddp_masks_equal"] == "1 8" and lines["gpt2_nm_2_4"] == "1 8"
        assert lines["channels_refused"].startswith("granularity=channels: is not available under FSDP2")
    whole, cut = ranks[0]["whole_check"].split(" | ")
    assert whole == "None"  # a sharded checkpoint with its mask shards is whole; without their .metadata it is not
    assert cut == "sharded checkpoint without cut.ckpt/lightning_eff_pruning_masks/.metadata (cut short)"
    checked, layers = ranks[0]["pruning_qat"].split()
    assert checked == layers and int(layers) >= 8  # every QAT layer: 75% zeros, kept zero by the conversion
    assert ranks[0]["consolidated_equal"] == "1"  # strict load into the plain model, zeros included
    achieved, nonzero, zeros = ranks[0]["report"].split()
    assert achieved == ranks[0]["global_sparsity"] and int(nonzero) == int(zeros)  # 50%: as many kept as zeroed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy (FSDP1) needs a CUDA device")
def test_fsdp1_is_refused_in_one_line_before_training(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.5, end_step=4)
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=FSDPStrategy(), max_steps=2, callbacks=[callback],
                        logger=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match="GradualPruning needs FSDP2"):
        trainer.fit(TinyGPT(n_layer=1, d_model=32, seq_len=32), TextDataModule(seq_len=32, max_bytes=20_000))
    assert trainer.global_step == 0
