"""Quantization through the `lightning-eff` app: members, validation before training, report, DDP, pruning."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_eff import QuantizationAwareTraining
from lightning_eff.cli import instantiate_group
from lightning_eff.config import validate
from lightning_eff.quantization import SCHEMES
from lightning_eff.validation import ConfigError
from tests.conftest import compose_app_config, read_report, run_cli


@pytest.mark.parametrize("member", list(SCHEMES))
def test_members_build_the_callback_they_name(member: str) -> None:
    callback = instantiate_group(compose_app_config([f"quantization={member}"]), "quantization")
    assert isinstance(callback, QuantizationAwareTraining)
    assert callback.scheme.name == member


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["quantization.scheme=int3"],
            "quantization.scheme=int3: must be one of int8_dynamic_act_int4_weight, int4_weight_only, "
            "int8_weight_only, int8_dynamic",
        ),
        (["quantization.group_size=0"], "quantization.group_size=0: must be >= 1"),
        (["quantization.start_step=-1"], "quantization.start_step=-1: must be >= 0"),
        (["quantization.start_step=soon"], "quantization.start_step=soon: must be of type int"),
        (["+quantization.bits=4"], "quantization.bits=4: unknown key; quantization takes scheme"),
    ],
)
def test_bad_quantization_values_name_the_key(overrides: list[str], message: str) -> None:
    cfg = compose_app_config(["quantization=int4_weight_only", *overrides])
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
        instantiate_group(cfg, "quantization")
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("overrides", "stderr"),
    [
        (
            ["quantization.group_size=48"],
            "quantization.group_size=48: must divide the input width of every quantized layer; net.1 has 64 "
            "(exclude it, or pick a divisor of 64)",
        ),
        (
            ["quantization.include=[encoder.*]"],
            "quantization.include=encoder.*: matches no quantizable layer; layers: net.1, net.4, net.7",
        ),
    ],
)
def test_cli_refuses_a_model_mismatch_before_training(overrides: list[str], stderr: str, tmp_path: Path) -> None:
    result = run_cli(["quantization=int4_weight_only", *overrides, f"run_dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"lightning-eff: error: {stderr}"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_cli_qat_on_two_gloo_processes_with_pruning_reports_and_exports(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "quantization=int8_dynamic_act_int4_weight",
            "quantization.start_step=50",
            f"quantization.export_path={run_dir}/quantized.pt2",
            "pruning=gradual_magnitude",
            "pruning.target_sparsity=0.5",
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.max_epochs=10",
            f"run_dir={run_dir}",
        ],
        tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(run_dir)
    summary = report["quantization"]["summary"]
    assert summary["scheme"] == "int8_dynamic_act_int4_weight" and summary["fake_quant_from_step"] == 50
    assert summary["weight_size_ratio"] <= 1 / 6
    metrics = {row["metric"]: row for row in report["quantization"]["rows"]}
    assert abs(metrics["test_acc"]["converted"] - metrics["test_acc"]["fake_quantized"]) <= 0.005
    assert metrics["test_acc"]["fake_quantized"] > 0.85
    assert report["pruning"]["summary"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert (run_dir / "quantized.pt2").is_file()
    assert result.stderr.count("wrote the int8_dynamic_act_int4_weight model") == 1
