"""train.log_with: the recipe's experiment trackers through Accelerate (here MLflow writing to a local file:// folder,
no server), next to logs/metrics.jsonl, which is always written; and what training records for the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from derm_accel.core.tracking import read_metrics
from derm_accel.training.config import RecipeError, load_recipe
from derm_accel.training.train import train
from tests.train_utils import make_dataset, reset_accelerate, tiny_recipe


@pytest.fixture(autouse=True)
def _clean_state():
    torch.set_num_threads(2)
    reset_accelerate()
    yield
    reset_accelerate()


def test_log_with_defaults_and_refusals(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "data", tmp_path / "run")
    assert load_recipe(recipe).train.log_with == ["tensorboard"]
    assert load_recipe(recipe, ["train.log_with=wandb"]).train.log_with == ["wandb"]
    assert load_recipe(recipe, ["train.log_with=[]"]).train.log_with == []
    with pytest.raises(RecipeError, match=r"unknown tracker.*tensorboard"):  # the list is Accelerate's
        load_recipe(recipe, ["train.log_with=[tensorbord]"])


def test_the_trackers_are_accelerates_own(tmp_path: Path) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    import derm_accel.training.config as config

    recipe = tiny_recipe(tmp_path / "data", tmp_path / "run")
    assert set(config.TRACKERS) == {str(name) for name in LOGGER_TYPE_TO_CLASS} and "all" not in config.TRACKERS
    for name in config.TRACKERS:  # every tracker Accelerate integrates is accepted
        assert load_recipe(recipe, [f"train.log_with={name}"]).train.log_with == [name]


def test_mlflow_tracker_gets_the_same_metrics_as_the_jsonl_log(tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    store = (tmp_path / "mlruns").as_uri()  # a local file:// folder: no server, no network
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    data = make_dataset(tmp_path / "data", size=32)
    recipe = tiny_recipe(data, tmp_path / "run", train={"log_with": ["mlflow"], "epochs": 2, "max_steps_per_epoch": 1})
    run_dir = train(recipe)

    assert not list((run_dir / "logs").rglob("events.out.tfevents*"))  # no TensorBoard asked for
    jsonl = [r for r in read_metrics(run_dir / "logs") if "val/accuracy" in r]
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "train"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["val/accuracy"] for r in jsonl])
    assert len(history) == 2
    assert run.data.params["optim.lr"] == "0.003"  # the recipe, flattened

    info = json.loads((run_dir / "best" / "training_info.json").read_text())
    assert info["base_model"] is None  # trained from scratch: the card says so instead of naming ImageNet weights
    assert json.loads((run_dir / "best" / "config.json").read_text())["pretrained_cfg"]["license"] == "apache-2.0"
