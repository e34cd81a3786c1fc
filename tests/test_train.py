"""The training loop on the CPU with a ~100k-parameter model at 32 px: resume, export, bf16, NaN, stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import derm_accel.training.setup as train_setup
import derm_accel.training.train as train_module
from derm_accel.core.tracking import read_metrics
from derm_accel.training.checkpoints import list_checkpoints
from derm_accel.training.config import RecipeError
from derm_accel.training.train import NonFiniteLossError, train
from tests.train_utils import make_dataset, reset_accelerate, tiny_recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train") / "data", size=32)


@pytest.fixture(autouse=True)
def _clean_state():
    torch.set_num_threads(2)
    reset_accelerate()
    yield
    reset_accelerate()


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def test_interrupted_and_resumed_run_equals_uninterrupted(data: Path, tmp_path: Path) -> None:
    """Stop mid-epoch, resume with "latest": same weights, EMA and optimizer as a run never stopped.

    Dropout and drop-path are on, so this also checks that the RNG state and the data order come back.
    """
    sections = dict(
        model={"drop_rate": 0.2, "drop_path_rate": 0.1},
        data={"balance": "sampler"},
        optim={"ema": True, "ema_decay": 0.9, "grad_accum": 2},
        train={"epochs": 2},
    )
    full = train(tiny_recipe(data, tmp_path / "full", **sections))
    reset_accelerate()
    # 6 batches per epoch, 2 per optimizer step: stop after step 2 of epoch 1 (batch 4 of 6).
    stopped = tmp_path / "stopped"
    train(tiny_recipe(data, stopped, **sections), overrides=["train.stop_after_steps=2"])
    assert [p.name for p in list_checkpoints(stopped)] == ["step_000000002"]
    assert not (stopped / "best").exists()
    state = json.loads((list_checkpoints(stopped)[0] / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (0, 4, 2)
    reset_accelerate()
    train(tiny_recipe(data, stopped, **sections), resume="latest")

    last_full, last_resumed = list_checkpoints(full)[-1], list_checkpoints(stopped)[-1]
    assert last_full.name == last_resumed.name == "step_000000006"
    w_full, w_resumed = _weights(last_full), _weights(last_resumed)
    for key in w_full:
        torch.testing.assert_close(w_resumed[key], w_full[key], rtol=0, atol=0, msg=key)
    ema_full = load_file(last_full / "ema.safetensors")
    ema_resumed = load_file(last_resumed / "ema.safetensors")
    for key in ema_full:
        torch.testing.assert_close(ema_resumed[key], ema_full[key], rtol=0, atol=0, msg=key)
    # The logged validation metrics of the last epoch agree too.
    val_full = [r for r in read_metrics(full / "logs") if "val/macro_f1" in r]
    val_resumed = [r for r in read_metrics(stopped / "logs") if "val/macro_f1" in r]
    assert val_full[-1]["val/loss"] == pytest.approx(val_resumed[-1]["val/loss"], abs=1e-6)
    # The interrupted epoch's train loss includes the batches before the interruption.
    assert val_resumed[0]["train/loss_epoch"] == pytest.approx(val_full[0]["train/loss_epoch"], rel=1e-5)
    # EMA on: the exported model is the EMA, not the raw weights.
    best = load_file(full / "best" / "model.safetensors")
    best_epoch = json.loads((full / "best" / "training_info.json").read_text())["best_epoch"]
    epoch_ckpt = full / "checkpoints" / f"step_{3 * best_epoch:09d}"
    ema_at_best = load_file(epoch_ckpt / "ema.safetensors")
    key = "conv_stem.weight"
    torch.testing.assert_close(best[key], ema_at_best[f"module.{key}"].float())
    assert not torch.equal(best[key], _weights(epoch_ckpt)[key])


def test_resume_after_a_crash_logs_each_step_once(data: Path, tmp_path: Path) -> None:
    """Steps logged after the last checkpoint are run again on resume; metrics.jsonl reads as one run."""
    import shutil

    sections = dict(optim={"grad_accum": 2})  # 6 batches per epoch, 3 optimizer steps
    full = train(tiny_recipe(data, tmp_path / "full", **sections))
    reset_accelerate()
    crashed = tmp_path / "crashed"
    # Checkpoints at step 3 (end of epoch 1) and 4 (stop); losing the second is a crash after step 4 was logged.
    train(tiny_recipe(data, crashed, **sections), overrides=["train.stop_after_steps=4"])
    shutil.rmtree(crashed / "checkpoints" / "step_000000004")
    reset_accelerate()
    train(tiny_recipe(data, crashed, **sections), resume="latest")

    raw = [json.loads(line) for line in (crashed / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw if "train/loss" in r].count(4) == 2  # the file keeps both attempts
    assert [(r["step"], r["epochs_done"]) for r in raw if r.get("event") == "resume"] == [(3, 1)]
    resumed, uninterrupted = read_metrics(crashed / "logs"), read_metrics(full / "logs")
    assert [(r["step"], sorted(r)) for r in resumed] == [(r["step"], sorted(r)) for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        for key in ("train/loss", "val/loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)


def test_read_metrics_drops_what_a_crashed_attempt_logged_after_its_checkpoint(tmp_path: Path) -> None:
    lines = [
        {"event": "config", "config": {}},
        {"step": 1, "train/loss": 3.0, "epoch": 1},
        {"step": 2, "train/loss": 2.0, "epoch": 1},
        {"step": 2, "train/loss_epoch": 2.5, "epoch": 1},  # epoch 1 closed at step 2, after the checkpoint
        {"step": 3, "train/loss": 1.0, "epoch": 2},
        {"event": "resume", "step": 2, "epochs_done": 0},  # that checkpoint was taken on epoch 1's last batch
        {"step": 2, "train/loss_epoch": 2.4, "epoch": 1},
        {"step": 3, "train/loss": 1.1, "epoch": 2},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_metrics(tmp_path) == [lines[1], lines[2], lines[6], lines[7]]


def test_best_export_loads_with_plain_timm(data: Path, tmp_path: Path) -> None:
    run = train(
        tiny_recipe(data, tmp_path / "run", train={"epochs": 2, "channels_last": True}),
        overrides=["optim.label_smoothing=0.0", "data.balance=weighted_loss"],
    )
    best = run / "best"
    info = json.loads((best / "training_info.json").read_text())
    assert info["epochs_run"] == 2 and info["best_epoch"] in (1, 2)
    assert info["dataset_class_names"] == ["basal_cell_carcinoma", "melanoma", "nevus"]
    assert info["num_processes"] == 1 and info["mixed_precision"] == "no"
    assert info["license"] == "apache-2.0" and info["train_images_per_s"] > 0
    assert info["device_name"].startswith("CPU")
    val = json.loads((best / "val_metrics.json").read_text())
    assert val["num_samples"] == 15 and 0 <= val["macro_f1"] <= 1
    published = yaml.safe_load((best / "recipe.yaml").read_text())
    assert published["data"]["balance"] == "weighted_loss"
    # The exported folder goes to the Hub: no absolute local paths; the run's own recipe keeps them as given.
    assert published["data"]["path"] == Path(*data.parts[-2:]).as_posix() and published["output_dir"] == (
        Path(*run.parts[-2:]).as_posix()
    )
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["path"] == str(data)
    run_info = json.loads((run / "run_info.json").read_text())
    assert run_info["versions"]["timm"] == timm.__version__
    assert run_info["accelerate"]["num_processes"] == 1

    model = timm.create_model(f"local-dir:{best}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == info["dataset_class_names"]
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)
    # The export is the best epoch's weights: the same logits as the model in that epoch's checkpoint.
    reference = train_setup.create_model("test_efficientnet_gn", 3).eval()
    reference.load_state_dict(_weights(run / "checkpoints" / f"step_{6 * info['best_epoch']:09d}"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    # Logs: TensorBoard events and JSONL with the epoch metrics.
    assert list((run / "logs" / "train").glob("events.out.tfevents.*"))
    epochs = [r for r in read_metrics(run / "logs") if "val/accuracy" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"train/loss_epoch", "train/lr", "train/images_per_s", "val/loss", "val/macro_f1"} <= set(epochs[0])


def test_bf16_on_cpu(data: Path, tmp_path: Path) -> None:
    run = train(
        tiny_recipe(data, tmp_path / "run", train={"epochs": 1, "mixed_precision": "bf16", "max_steps_per_epoch": 2})
    )
    info = json.loads((run / "best" / "training_info.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["global_steps"] == 2
    steps = [r for r in read_metrics(run / "logs") if "train/loss" in r]
    assert len(steps) == 2 and all(0 < r["train/loss"] < 20 for r in steps)
    # Weights stay fp32 under autocast.
    assert all(v.dtype == torch.float32 for v in load_file(run / "best" / "model.safetensors").values())


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_create = train_setup.create_model

    def poisoned(*args, **kwargs):  # the 4th forward pass returns NaN logits
        model = real_create(*args, **kwargs)
        forward, calls = model.forward, []

        def forward_with_nan(x):
            calls.append(1)
            out = forward(x)
            return out * float("nan") if len(calls) == 4 else out

        model.forward = forward_with_nan
        return model

    monkeypatch.setattr(train_setup, "create_model", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 4 \(after optimizer step 3\)") as err:
        train(tiny_recipe(data, run, train={"epochs": 1, "checkpoint_every_steps": 2}))
    assert "step_000000002" in str(err.value) and "--resume latest" in str(err.value)
    assert "{0: nan} (process: value)" in str(err.value)
    assert [p.name for p in list_checkpoints(run)] == ["step_000000002"]
    assert all(torch.isfinite(v).all() for v in _weights(list_checkpoints(run)[0]).values())


def test_early_stopping_and_keep_last_checkpoints(data: Path, tmp_path: Path) -> None:
    # A learning rate this small cannot change a prediction: macro-F1 never improves after epoch 1.
    run = train(
        tiny_recipe(
            data,
            tmp_path / "run",
            optim={"lr": 1e-12, "warmup_epochs": 0},
            train={
                "epochs": 5,
                "early_stopping_patience": 1,
                "max_steps_per_epoch": 1,
                "keep_checkpoints": 2,
            },
        )
    )
    info = json.loads((run / "best" / "training_info.json").read_text())
    assert info["epochs_run"] == 2 and info["best_epoch"] == 1 and info["stopped_early"] is True
    assert [p.name for p in list_checkpoints(run)] == ["step_000000001", "step_000000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # Starting again over a run that has checkpoints must be explicit.
    reset_accelerate()
    with pytest.raises(FileExistsError, match="--resume latest"):
        train(tiny_recipe(data, tmp_path / "run"))


def test_bad_recipe_fails_before_training(data: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"optim\.lr"):
        train(tiny_recipe(data, tmp_path / "run"), overrides=["optim.lr=fast"])
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        train(tiny_recipe(tmp_path / "nowhere", tmp_path / "run"))


def test_resume_with_another_batch_layout_is_refused(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_recipe(data, run, train={"epochs": 1, "stop_after_steps": 1}))
    changed = tiny_recipe(data, run, train={"epochs": 1}, data={"batch_size": 3})
    with pytest.raises(RecipeError, match=r"same number of processes, data\.batch_size"):
        train(changed, resume="latest")


def test_stronger_recipes_train_layer_decay_mixup_cutmix_and_trivialaugment(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from timm.data import Mixup

    from derm_accel.training.config import OptimConfig

    # Layer-wise decay: the head keeps the base rate, the stem gets decay**depth of it, the schedule scales all.
    model = timm.create_model("test_efficientnet", num_classes=3)
    optimizer = train_setup.build_optimizer(model, OptimConfig(lr=1e-3, layer_decay=0.5))
    rates = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert rates[-1] == pytest.approx(1e-3) and rates[0] < 1e-3 / 8 and "lr_scale" not in optimizer.param_groups[0]

    mixed = []
    real_step = train_module.train_step

    def spy(run, state, batch, epoch):
        mixed.append(isinstance(run.mixup, Mixup))
        return real_step(run, state, batch, epoch)

    monkeypatch.setattr(train_module, "train_step", spy)
    augment = {"scale": [0.5, 1.0], "auto_augment": "trivialaugment", "mixup": 0.2, "cutmix": 1.0}
    recipe = tiny_recipe(
        data,
        tmp_path / "run",
        data={"augment": augment},
        optim={"layer_decay": 0.8},
        train={"epochs": 1, "max_steps_per_epoch": 2},
    )
    run = Path(train(recipe))
    assert mixed == [True, True]
    assert (run / "best" / "model.safetensors").is_file()
    steps = [r for r in read_metrics(run / "logs") if "train/loss" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor([r["train/loss"] for r in steps])))
    assert steps[0]["train/lr"] > 0.5 * 3e-3 * 0.5  # the head's (largest) rate is logged, not the stem's
    with pytest.raises(RecipeError, match="batch_size must be even"):
        train(recipe, overrides=["data.batch_size=7"])
    with pytest.raises(RecipeError, match="auto_augment"):
        train(recipe, overrides=["data.augment.auto_augment=autoaugment"])
