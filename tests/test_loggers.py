"""MLflow (local file store) and W&B (offline) loggers in the app: a capability's metrics land in each."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from lightning_eff.loggers import check_logger_installed
from lightning_eff.validation import ConfigError
from tests.conftest import read_report, run_cli

pytestmark = pytest.mark.slow

PRUNED_RUN = [
    "trainer.max_epochs=2",
    "pruning=gradual_magnitude",
    "pruning.target_sparsity=0.5",
    "pruning.update_every=5",
]


def test_mlflow_file_store_gets_the_pruning_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the app allows its file store itself
    result = run_cli(["logger=mlflow", *PRUNED_RUN, f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": ""})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client
    client = mlflow.MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("lightning-eff")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == tmp_path.name
    sparsity = [m.value for m in client.get_metric_history(run.info.run_id, "pruning/sparsity")]
    assert len(sparsity) > 2 and sparsity == sorted(sparsity) and sparsity[-1] == pytest.approx(0.5)
    assert run.data.metrics["test_acc"] == pytest.approx(read_report(tmp_path)["run"]["summary"]["test_acc"])


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """The history rows of an offline W&B run file (its records: a LevelDB-style log of protobuf `Record`s)."""
    import json

    from wandb.proto import wandb_internal_pb2

    data, block, position = path.read_bytes(), 32768, 7  # after the ":W&B" header
    rows, pending = [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})  # fmt: skip
    return rows


def test_wandb_offline_run_gets_the_pruning_metrics(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    result = run_cli(["logger=wandb", *PRUNED_RUN, f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                     env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    sparsity = [row["pruning/sparsity"] for row in rows if "pruning/sparsity" in row]
    assert len(sparsity) > 2 and sparsity == sorted(sparsity) and sparsity[-1] == pytest.approx(0.5)
    test_acc = read_report(tmp_path)["run"]["summary"]["test_acc"]
    assert [row["test_acc"] for row in rows if "test_acc" in row] == [pytest.approx(test_acc)]


def test_a_missing_logger_package_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError) as error:
        check_logger_installed("wandb")
    assert str(error.value) == "logger=wandb: needs the wandb package: pip install 'lightning-eff[wandb]'"
    check_logger_installed("csv")  # needs nothing
