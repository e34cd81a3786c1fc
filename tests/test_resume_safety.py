"""Resume under adversarial tries: changed recipes, damaged or crafted checkpoint files, weights gone NaN.

One short run (2 optimizer steps, a checkpoint after each) is trained once per module and copied per test.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import derm_accel.training.setup as train_setup
from derm_accel.core.tracking import read_metrics
from derm_accel.training.checkpoint_files import CheckpointError, load_tensors_file, verify_checkpoint, write_manifest
from derm_accel.training.checkpoints import list_checkpoints, verified_checkpoint
from derm_accel.training.config import RecipeError
from derm_accel.training.train import NonFiniteLossError, train
from tests.train_utils import make_dataset, reset_accelerate, tiny_recipe

STOPPED = {"epochs": 1, "checkpoint_every_steps": 1, "keep_checkpoints": 2, "stop_after_steps": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("resume") / "data", size=32)


@pytest.fixture(scope="module")
def stopped_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    reset_accelerate()
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(tiny_recipe(data, run, optim={"ema": True, "ema_decay": 0.9}, train=STOPPED))
    reset_accelerate()
    return run


@pytest.fixture
def run(stopped_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    reset_accelerate()
    yield copy
    reset_accelerate()


def _recipe(data: Path, run: Path, **train_keys) -> dict:
    return tiny_recipe(data, run, optim={"ema": True, "ema_decay": 0.9}, train={**STOPPED, **train_keys})


class _Payload:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checkpoints_hold_no_pickles_and_a_manifest(stopped_run: Path) -> None:
    for checkpoint in list_checkpoints(stopped_run):
        names = {p.name for p in checkpoint.iterdir()}
        assert not [n for n in names if n.endswith(".pkl")], names
        assert {"manifest.json", "rng_state_0.safetensors", "ema.safetensors", "recipe.json"} <= names
        assert verify_checkpoint(checkpoint) == []


def test_changed_recipe_is_refused_with_its_keys_before_anything_is_written(data: Path, run: Path) -> None:
    before = (run / "recipe.yaml").read_text()
    with pytest.raises(RecipeError, match=r"optim\.lr \(0\.003 -> 0\.3\).*--resume-with-changes") as err:
        train(_recipe(data, run), overrides=["optim.lr=0.3", "model.drop_rate=0.5"], resume="latest")
    assert "model.drop_rate" in str(err.value) and "train.epochs" in str(err.value)  # the changeable keys named
    with pytest.raises(RecipeError, match=r"data\.batch_size \(8 -> 4\).*same number of processes"):
        train(_recipe(data, run), overrides=["data.batch_size=4"], resume="latest", resume_with_changes=True)
    assert (run / "recipe.yaml").read_text() == before
    assert [p.name for p in list_checkpoints(run)] == ["step_000000001", "step_000000002"]


def test_resume_with_changes_applies_the_new_lr_and_records_it(data: Path, run: Path) -> None:
    # Crafted pickles planted where Accelerate would read them: a resume must never unpickle them.
    marker = run / "code_ran.txt"
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (run / "checkpoints" / "step_000000002" / name).write_bytes(pickle.dumps(_Payload(marker)))
    train(_recipe(data, run, stop_after_steps=1), overrides=["optim.lr=0.3"], resume="latest", resume_with_changes=True)
    assert not marker.exists()
    # The optimizer really ran with the new learning rate (step 3 is past the 3-update warmup: lr = base lr).
    step3 = run / "checkpoints" / "step_000000003"
    groups = load_tensors_file(step3 / "optimizer.bin")["param_groups"]
    assert {g["initial_lr"] for g in groups} == {0.3}
    assert [g["lr"] for g in groups] == pytest.approx([0.3] * len(groups))
    assert [r["train/lr"] for r in read_metrics(run / "logs") if r["step"] == 3] == [pytest.approx(0.3)]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["optim"]["lr"] == 0.3
    changes = json.loads((run / "run_info.json").read_text())["recipe_changes"]
    by_kind = {c["kind"]: c["changes"] for c in changes}
    assert by_kind["forced"] == {"optim.lr": [0.003, 0.3]}
    assert by_kind["resumable"]["train.stop_after_steps"] == [2, 1]  # the copy's output_dir is named there too
    assert sorted(by_kind["resumable"]) == ["output_dir", "train.stop_after_steps"]
    assert {c["step"] for c in changes} == {2}


def test_damaged_checkpoint_files_are_named_and_latest_falls_back(run: Path) -> None:
    newest, previous = list_checkpoints(run)[-1], list_checkpoints(run)[0]
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "ema.safetensors", "rng_state_0.safetensors"):
        original = (newest / name).read_bytes()
        (newest / name).write_bytes(original[: len(original) // 2])
        with pytest.raises(CheckpointError, match=rf"{name} has \d+ bytes, the manifest says \d+: truncated"):
            verify_checkpoint(newest)
        (newest / name).write_bytes(original)
    rng = newest / "rng_state_0.safetensors"
    content = bytearray(rng.read_bytes())
    content[-100] ^= 0xFF  # same size, one byte of a generator state changed
    rng.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match=r"rng_state_0\.safetensors does not match its sha256"):
        verified_checkpoint(str(newest), run)  # named explicitly: refused
    said: list[str] = []
    assert verified_checkpoint("latest", run, say=said.append) == previous
    assert "rng_state_0.safetensors" in said[0] and f"falling back to {previous}" in said[-1]


def test_a_crafted_state_file_with_a_matching_manifest_is_refused_without_running_it(run: Path) -> None:
    checkpoint = list_checkpoints(run)[-1]
    marker = run / "code_ran.txt"
    torch.save({"state": _Payload(marker)}, checkpoint / "optimizer.bin")
    write_manifest(checkpoint)  # whoever crafted it also rewrote the manifest
    verify_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=r"optimizer\.bin cannot be loaded safely"):
        load_tensors_file(checkpoint / "optimizer.bin")
    assert not marker.exists()


def test_weights_gone_non_finite_are_never_checkpointed(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = train_setup.build_optimizer

    def exploding(model, cfg):  # the 2nd optimizer step leaves an inf in the weights, as lr=1e6 would
        optimizer, calls = real(model, cfg), []

        def explode(*_):
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))

        optimizer.register_step_post_hook(explode)
        return optimizer

    monkeypatch.setattr(train_setup, "build_optimizer", exploding)
    reset_accelerate()
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="after optimizer step 2") as err:
        train(tiny_recipe(data, run, train=STOPPED))
    assert "Last checkpoint with finite weights: " in str(err.value) and "step_000000001" in str(err.value)
    assert [p.name for p in list_checkpoints(run)] == ["step_000000001"]
    reset_accelerate()


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path: Path) -> None:
    from derm_accel.training.checkpoints import (
        CHECKPOINT_DIR,
        STATE_NAME,
        checkpoint_name,
        list_checkpoints,
        set_aside_later_checkpoints,
    )

    root = tmp_path / CHECKPOINT_DIR
    for step in (4, 8, 12):
        (root / checkpoint_name(step)).mkdir(parents=True)
        (root / checkpoint_name(step) / STATE_NAME).write_text("{}")
    moved = set_aside_later_checkpoints(tmp_path, root / checkpoint_name(4))
    assert [p.name for p in moved] == [f".abandoned-{checkpoint_name(s)}" for s in (8, 12)]
    assert list_checkpoints(tmp_path) == [root / checkpoint_name(4)]  # the next --resume latest and pruning
    assert all((p / STATE_NAME).exists() for p in moved)  # kept, not deleted
    assert set_aside_later_checkpoints(tmp_path, tmp_path / "elsewhere" / checkpoint_name(2)) == []


def test_resume_refuses_a_change_of_optimizer_groups_even_with_changes_allowed(tmp_path: Path) -> None:
    from derm_accel.training.config import RecipeError
    from derm_accel.training.resume import check_changes

    with pytest.raises(RecipeError, match="parameter groups"):
        check_changes({"optim.layer_decay": (None, 0.8)}, tmp_path / "step_4", allow=True)
