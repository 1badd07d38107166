"""GradualPruning on the models people train (tests/zoo): targets, sparsity, tied weights, resume, lifecycle.

Every zoo model is pruned in a short real fit, unstructured (global scope, 60%) and 2:4 (layer scope, 50%).
2:4 skips what it cannot group: Conv2d layers (n:m is for matrix weights: ResNet's and the depthwise CNN's
convolutions, ViT's patch embedding) and, by default, heads tied to an embedding (as for unstructured).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_eff import GradualPruning
from lightning_eff.pruning.dependency import analyze
from lightning_eff.pruning.group_plan import producers
from lightning_eff.pruning.layers import register_prunable, unregister_prunable
from lightning_eff.validation import ConfigError
from tests.zoo.models import ZOO, ZOO_BY_NAME, ZooBatches, ZooTask

QUIET: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False}  # fmt: skip
BATCHES = 4  # per epoch
STEPS = 8  # end_step=None -> 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _layers(prefix: str, blocks: int, names: tuple[str, ...]) -> list[str]:
    return [f"model.{prefix}.{block}.{name}" for block in range(blocks) for name in names]


GPT2_CONV1D = _layers("transformer.h", 2, ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
BERT = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")  # fmt: skip
LLAMA = _layers("model.layers", 2, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))  # fmt: skip
VIT = _layers("blocks", 2, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
RESNET_CONVS = [
    "model.conv1",
    *_layers("layer1", 2, ("conv1", "conv2")),
    "model.layer2.0.conv1",
    "model.layer2.0.conv2",
    "model.layer2.0.downsample.0",
    *_layers("layer2", 2, ("conv1", "conv2"))[2:],
]
ENCODER = _layers("encoder.layers", 2, ("self_attn", "self_attn.out_proj", "linear1", "linear2"))

CLASSIFIER = ["model.classifier"]

# module names targeted by default: (unstructured, n:m 2:4)
EXPECTED: dict[str, tuple[list[str], list[str]]] = {
    "gpt2": (GPT2_CONV1D, GPT2_CONV1D),  # lm_head is tied to wte: dense unless included
    "bert": (_layers("encoder.layer", 2, BERT),) * 2,
    "bert_mlm": ([*_layers("bert.encoder.layer", 2, BERT), "model.cls.predictions.transform.dense"],) * 2,
    "llama_tied": (LLAMA, LLAMA),
    "llama": ([*LLAMA, "model.lm_head"],) * 2,
    "resnet": ([*RESNET_CONVS, "model.fc"], ["model.fc"]),
    "vit": (["model.patch_embed", *VIT, "model.head"], [*VIT, "model.head"]),
    "transformer_encoder": ([*ENCODER, "model.head"],) * 2,
    "depthwise_cnn": (["model.stem.0", "model.depthwise.0", "model.pointwise.0", "model.classifier"], CLASSIFIER),
}
GRANULARITIES = {
    "unstructured": {"target_sparsity": 0.6},
    "n:m": {"target_sparsity": 0.5, "granularity": "n:m", "pattern": "2:4", "scope": "layer"},
}


def fit_zoo(
    name: str,
    callback: GradualPruning,
    root: Path,
    max_steps: int = STEPS,
    ckpt_path: str | None = None,
    task: ZooTask | None = None,
    extra: list[L.Callback] | None = None,
    batches: int = BATCHES,
) -> tuple[ZooTask, L.Trainer]:
    """A short fit that checkpoints every 4 optimizer steps (`root`/step=4.ckpt is mid-schedule)."""
    L.seed_everything(0, verbose=False)
    task = task or ZooTask(name)
    saver = ModelCheckpoint(dirpath=root, filename="{step}", save_top_k=-1, every_n_train_steps=4)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback, saver, *(extra or [])], enable_checkpointing=True,
                        default_root_dir=root, **QUIET)  # fmt: skip
    trainer.fit(task, DataLoader(ZooBatches(name, count=batches), batch_size=None), ckpt_path=ckpt_path)
    return task, trainer


def pruning(granularity: str, **kwargs: Any) -> GradualPruning:
    return GradualPruning(update_every=2, **{**GRANULARITIES[granularity], **kwargs})


def grouped_along_input(weight: torch.Tensor, input_dim: int, m: int) -> torch.Tensor:
    """Zeros per group of `m` consecutive weights along the input dimension: shape [..., groups]."""
    rows = weight.detach().movedim(input_dim, -1)
    return (rows.reshape(-1, rows.shape[-1] // m, m) == 0).sum(dim=2)


@pytest.mark.parametrize("granularity", list(GRANULARITIES))
@pytest.mark.parametrize("name", [entry.name for entry in ZOO])
def test_zoo_model_reaches_the_target_on_the_expected_layers_and_resumes_exactly(
    name: str, granularity: str, tmp_path: Path
) -> None:
    # One batch, trained on at every step: Lightning restores a checkpoint's loop position but not the loader's,
    # so with several batches the resumed run would see them in another order (lightning_eff/resume.py).
    callback = pruning(granularity)
    task, _ = fit_zoo(name, callback, tmp_path / "full", batches=1)
    expected = EXPECTED[name][0 if granularity == "unstructured" else 1]
    assert [t.module for t in callback.targets] == expected
    state = task.state_dict()
    weights = {t.weight: state[t.weight] for t in callback.targets}
    if granularity == "unstructured":  # global scope: one threshold, within half a point
        zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
        assert abs(zeros - 0.6) <= 0.005
    else:  # layer scope: exact per tensor, and exactly 2 zeros in every 4 consecutive inputs
        for target in callback.targets:
            weight = weights[target.weight]
            assert int((weight == 0).sum()) == round(0.5 * weight.numel()), target.weight
            assert (grouped_along_input(weight, target.input_dim, 4) == 2).all(), target.weight
    assert callback.reached_target and callback.masks
    for first, second in ZOO_BY_NAME[name].tied:  # one tensor under two names; the embedding stays dense
        assert torch.equal(state[f"model.{first}"] == 0, state[f"model.{second}"] == 0)
        assert not (state[f"model.{second}"] == 0).any()

    resumed_callback = pruning(granularity)
    checkpoint = tmp_path / "full" / "step=4.ckpt"
    resumed, _ = fit_zoo(name, resumed_callback, tmp_path / "resumed", ckpt_path=str(checkpoint), batches=1)
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    mid_schedule = next(value for key, value in saved.items() if key.startswith("GradualPruning"))["mask_sparsity"]
    assert 0 < mid_schedule < GRANULARITIES[granularity]["target_sparsity"]
    assert resumed_callback.masks.keys() == callback.masks.keys()
    for key, mask in callback.masks.items():
        assert torch.equal(resumed_callback.masks[key], mask), key
    for key, value in resumed.state_dict().items():
        assert torch.equal(value == 0, state[key] == 0), key
        assert torch.allclose(value, state[key], atol=1e-5), key


def test_gpt2_prunes_its_eight_conv1d_weights_by_their_layout(tmp_path: Path) -> None:
    callback = pruning("n:m")
    task, _ = fit_zoo("gpt2", callback, tmp_path)
    assert [t.weight for t in callback.targets] == [f"{name}.weight" for name in GPT2_CONV1D]
    assert all(t.layout == (1, 0) for t in callback.targets)  # HF Conv1D: weight [in, out]
    assert "model.lm_head" in callback.left_dense and "wte" in callback.left_dense["model.lm_head"]
    c_fc = task.model.transformer.h[0].mlp.c_fc.weight  # [32 in, 128 out]: 2:4 runs down the rows
    assert (grouped_along_input(c_fc, 0, 4) == 2).all()
    assert not (grouped_along_input(c_fc, 1, 4) == 2).all()


@pytest.mark.parametrize("name", [entry.name for entry in ZOO if entry.tied])
def test_an_included_tied_head_is_pruned_once_with_one_mask_for_both_names(name: str, tmp_path: Path) -> None:
    head_weight, embedding = (f"model.{parameter}" for parameter in ZOO_BY_NAME[name].tied[0])
    head = head_weight.removesuffix(".weight")
    callback = GradualPruning(target_sparsity=0.6, scope="layer", update_every=2, include=[head, "*.0.*"])
    task, trainer = fit_zoo(name, callback, tmp_path)
    tied = [t for t in callback.targets if t.module == head]
    assert len(tied) == 1 and tied[0].weight == embedding and tied[0].aliases == (head_weight,)
    assert head_weight not in callback.masks and embedding in callback.masks  # one mask, canonical name
    state = task.state_dict()
    assert torch.equal(state[head_weight] == 0, state[embedding] == 0)
    assert int((state[embedding] == 0).sum()) == round(0.6 * state[embedding].numel())
    section = callback.report_section(trainer, tmp_path)
    assert section.summary["tied"] == {embedding: [head_weight]}
    assert next(row for row in section.rows if row["layer"] == embedding)["tied_to"] == head_weight


@pytest.mark.parametrize(("name", "embedding"), [("llama", "model.model.embed_tokens"),
                                                  ("gpt2", "model.transformer.wpe"),
                                                  ("bert", "model.embeddings.word_embeddings")])  # fmt: skip
def test_an_embedding_is_pruned_only_when_included(name: str, embedding: str, tmp_path: Path) -> None:
    default = GradualPruning(target_sparsity=0.6, update_every=2)
    fit_zoo(name, default, tmp_path / "default", max_steps=2)
    assert embedding not in [t.module for t in default.targets]  # opt-in: dense unless named
    callback = GradualPruning(target_sparsity=0.6, scope="layer", update_every=2, include=[embedding, "*.0.*"])
    task, trainer = fit_zoo(name, callback, tmp_path / "included")
    table = task.state_dict()[f"{embedding}.weight"]
    assert int((table == 0).sum()) == round(0.6 * table.numel())
    rows = callback.report_section(trainer, tmp_path).rows
    assert any(row["layer"] == f"{embedding}.weight" for row in rows)
    for granularity, extra in (("n:m", {"pattern": "2:4"}), ("channels", {})):
        with pytest.raises(ConfigError, match=r"^include=.*(it is a Embedding|\(Embedding\), which is pruned)"):
            GradualPruning(granularity=granularity, include=[embedding], **extra).check_model(ZooTask(name))


# --- lifecycle --------------------------------------------------------------------------------------------


def test_a_second_fit_with_the_same_callback_continues_at_the_target(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.6, update_every=2)
    task, _ = fit_zoo("vit", callback, tmp_path / "first")
    first = {t.weight: task.state_dict()[t.weight] == 0 for t in callback.targets}
    assert callback.sparsity == pytest.approx(0.6, abs=0.005)
    _, trainer = fit_zoo("vit", callback, tmp_path / "second", task=task)
    assert callback.sparsity == pytest.approx(0.6, abs=0.005)  # not 0.0: the masks kept applying
    state = task.state_dict()
    assert all(torch.equal(state[name] == 0, zeros) for name, zeros in first.items())
    section = callback.report_section(trainer, tmp_path)
    assert section.summary["reached_target"] is True and section.summary["continued_from_sparsity"] == 0.6


def test_a_run_that_ends_before_end_step_warns_reports_and_a_second_fit_finishes(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.6, update_every=2, end_step=12)
    with pytest.warns(UserWarning) as caught:
        task, trainer = fit_zoo("vit", callback, tmp_path / "short", max_steps=6)
    messages = [str(w.message) for w in caught if "GradualPruning" in str(w.message)]
    assert len(messages) == 2
    assert messages[0].startswith("GradualPruning: end_step=12 is past this run's last optimizer step (6)")
    assert "training ended at step 6" in messages[1] and "target_sparsity=0.6" in messages[1]
    short = callback.sparsity
    assert 0.2 < short < 0.55
    section = callback.report_section(trainer, tmp_path)
    assert section.summary["reached_target"] is False
    assert (section.summary["end_step"], section.summary["planned_steps"]) == (12, 6)

    _, trainer = fit_zoo("vit", callback, tmp_path / "more", max_steps=14, task=task)  # continues to the target
    assert callback.sparsity == pytest.approx(0.6, abs=0.005)
    section = callback.report_section(trainer, tmp_path)
    assert section.summary["reached_target"] is True
    assert section.summary["continued_from_sparsity"] == pytest.approx(short, abs=0.005)


def test_early_stopping_before_end_step_warns_at_the_end(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.6, update_every=2)  # end_step=None -> 9 of 12 steps
    stop = EarlyStopping(monitor="train_loss", stopping_threshold=1e6, check_on_train_epoch_end=True)
    with pytest.warns(UserWarning, match=r"training ended at step 4, before the schedule reached"):
        _, trainer = fit_zoo("vit", callback, tmp_path, max_steps=12, extra=[stop])
    assert trainer.global_step == 4 and not callback.reached_target
    section = callback.report_section(trainer, tmp_path)
    assert (section.summary["end_step"], section.summary["planned_steps"]) == (9, 12)


def test_a_run_that_reaches_the_target_does_not_warn(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.6, update_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_zoo("vit", callback, tmp_path)
    assert not [w for w in caught if "GradualPruning" in str(w.message)]
    assert callback.schedule.end_step == 6  # end_step=None: 75% of the 8 planned steps


def test_resuming_a_finished_run_for_more_steps_keeps_its_masks(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.6, update_every=2)
    task, _ = fit_zoo("vit", callback, tmp_path / "first")
    first = {t.weight: task.state_dict()[t.weight] == 0 for t in callback.targets}
    resumed = GradualPruning(target_sparsity=0.6, update_every=2)
    checkpoint = str(tmp_path / "first" / "step=8.ckpt")  # the end of the run, at the target
    more, _ = fit_zoo("vit", resumed, tmp_path / "more", max_steps=12, ckpt_path=checkpoint)
    # end_step=None is now 9 of 12 steps, so the schedule says less than 0.6 at steps 8 to 9: the masks stay
    assert resumed.history == callback.history and resumed.reached_target
    assert all(((more.state_dict()[name] == 0) >= zeros).all() for name, zeros in first.items())
    assert resumed.sparsity == pytest.approx(0.6, abs=0.005)


def test_the_same_callback_on_another_model_starts_over(tmp_path: Path) -> None:
    callback = GradualPruning(target_sparsity=0.6, update_every=2, end_step=4)
    fit_zoo("vit", callback, tmp_path / "a", max_steps=6)
    fit_zoo("vit", callback, tmp_path / "b", max_steps=6, task=ZooTask("vit", seed=1))
    assert [entry["step"] for entry in callback.history] == [2, 4]  # this model's own schedule, from 0
    assert callback.sparsity == pytest.approx(0.6, abs=0.005)


# --- a kind the registry does not know --------------------------------------------------------------------


class Transposed(nn.Module):
    """y = x @ kernel + offset, with the kernel stored [in, out] like Hugging Face's Conv1D."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(inputs, outputs) / inputs**0.5)
        self.offset = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel + self.offset


class TransposedTask(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = Transposed(16, 32)
        self.head = nn.Linear(32, 4)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.relu(self.body(x))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_registered_custom_kind_is_pruned_along_its_own_layout() -> None:
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)) for _ in range(8)]
    with pytest.raises(ConfigError, match="include=body: matches no prunable layer"):
        GradualPruning(include="body").check_model(TransposedTask())
    register_prunable(Transposed, weight="kernel", output_dim=1, input_dim=0, bias="offset")
    try:
        L.seed_everything(0, verbose=False)
        task = TransposedTask()
        callback = GradualPruning(target_sparsity=0.5, granularity="n:m", pattern="2:4", scope="layer", update_every=2)
        L.Trainer(max_steps=8, callbacks=[callback], enable_checkpointing=False, **QUIET).fit(
            task, DataLoader(data, batch_size=None)
        )
        assert [(t.module, t.weight, t.layout) for t in callback.targets] == [
            ("body", "body.kernel", (1, 0)),
            ("head", "head.weight", (0, 1)),
        ]
        assert (grouped_along_input(task.body.kernel, 0, 4) == 2).all()  # groups run down the [in, out] rows
        # channels: the registered layout says which dimension produces (kernel's columns, with offset)
        chain = nn.Sequential(task.body, nn.ReLU(), task.head)
        analysis = analyze(chain, {"input": torch.randn(2, 16)})
        assert analysis.groups, analysis.skipped
        group = analysis.groups[0]
        assert group.dimensions() == {("0.kernel", 1), ("0.offset", 0), ("2.weight", 1)}
        assert producers(chain, group) == ["0"]
    finally:
        unregister_prunable(Transposed)
