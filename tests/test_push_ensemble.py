"""Push an ensemble folder (a `train --folds` run) as one Hub repo: members as subfolders, a card saying how to
load it; staged exactly, damaged members refused, and loaded back from the Hub with the same probabilities."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.hub_fixtures import LABELS, hub_env, run_python, write_model_dir, write_report_dir
from tests.hub_server import LocalHubServer

TOKEN = "hf_ensemble" + "TestSecret" + "5d1e"  # never a real token
REPO_ID = "derm-lab/tiny-derm-cv"
MEMBER_FILES = ("model.safetensors", "config.json", "recipe.yaml", "training_info.json", "val_metrics.json")


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/ as `train --folds 2` leaves it: fold_k/best plus checkpoints, fold data and logs, and ensemble.json."""
    from derm_accel.models.ensemble import write_ensemble

    run = tmp_path_factory.mktemp("cv2")
    write_model_dir(run / "fold_1", seed=1, guard=True)
    write_model_dir(run / "fold_2", seed=2)
    for fold in ("fold_1", "fold_2"):
        (run / fold / "checkpoints").mkdir()
        (run / fold / "checkpoints" / "last.safetensors").write_bytes(b"not published")
        (run / fold / "train.log").write_text("epoch 1\n")
    (run / "fold_data").mkdir()
    (run / "fold_data" / "folds.json").write_text("{}")
    (run / "oof_predictions.csv").write_text("source_path,label\n")
    write_ensemble(run, ["fold_1/best", "fold_2/best"], note=f"the 2 fold models of {run}")  # as train writes it
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluation report of the ensemble: each member scored beside it (as evaluate writes for an ensemble)."""
    folder = write_report_dir(tmp_path_factory.mktemp("report"))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["ensemble"] = {
        "combine": "mean of the members' probabilities",
        "members": [
            {"model": "runs/cv2/fold_1/best", "accuracy": 0.7312, "balanced_accuracy": 0.6401, "macro_f1": 0.6523},
            {"model": "runs/cv2/fold_2/best", "accuracy": 0.7204, "balanced_accuracy": 0.6661, "macro_f1": 0.6689},
        ],
        "guard": "the first member's domain guard",
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_dry_run_stages_the_ensemble_as_one_repo(run: Path, report: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from derm_accel.core.artifacts import ENSEMBLE_FILE
    from derm_accel.hub.push import ENSEMBLE_FILE as HUB_ENSEMBLE_FILE
    from derm_accel.hub.push import push_model

    assert HUB_ENSEMBLE_FILE == ENSEMBLE_FILE
    before = _tree_hashes(run)
    staged = Path(push_model(run, REPO_ID, report_dir=report, dry_run=True, out=tmp_path / "staged"))
    files = _tree_hashes(staged)
    expected = (
        {"README.md", "ensemble.json", "fold_1/domain_guard.safetensors"}
        | {f"fold_{k}/{name}" for k in (1, 2) for name in MEMBER_FILES}
        | {f"eval/{p.name}" for p in report.iterdir()}
    )
    assert set(files) == expected  # no checkpoints, fold data, logs or out-of-fold predictions
    for k in (1, 2):
        for name in MEMBER_FILES:
            assert files[f"fold_{k}/{name}"] == before[f"fold_{k}/best/{name}"]
    assert json.loads((staged / "ensemble.json").read_text()) == {
        "format": 1,
        "combine": "mean_probability",
        "members": ["fold_1", "fold_2"],
        "note": "members from the pushed folder's fold_1/best, fold_2/best",  # the local run path stays private
    }
    assert _tree_hashes(run) == before

    card = ModelCard.load(staged / "README.md")
    text = card.text
    assert card.data.license == "cc-by-nc-4.0" and "ensemble" in card.data.tags
    assert card.data.library_name is None  # the root is no timm model: no "use in timm" snippet on the Hub
    assert "An ensemble of 2 `test_efficientnet` classifiers" in text and "averages the members' probabilities" in text
    assert "| `fold_1/` | `test_efficientnet` | 3 | 2 | 0.660 | yes |" in text
    assert "| `fold_2/` | `test_efficientnet` | 3 | 2 | 0.660 | no |" in text
    # Headline metrics, then each member beside the ensemble, named by its subfolder (not the local path).
    assert "| Accuracy | 0.784 (95% CI 0.720-0.840) |" in text and "| Macro F1 | 0.709 (95% CI 0.630-0.780) |" in text
    assert "| `fold_1/` | 0.731 | 0.640 | 0.652 |" in text and "| `fold_2/` | 0.720 | 0.666 | 0.669 |" in text
    assert "| **ensemble** | **0.784** | **0.707** | **0.709** |" in text
    assert "runs/cv2" not in text and str(run) not in text
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["Macro F1"] == pytest.approx(0.7093)
    # How to load: the whole ensemble with derm-accel, one member with timm; never hf-hub: for the whole repo.
    assert f"derm-accel predict lesion.jpg --model {REPO_ID}" in text
    assert f"derm-accel evaluate --model {REPO_ID}" in text
    python = "\n".join(_code_blocks(text, "python"))
    assert f'load_models("{REPO_ID}")' in python
    assert f'snapshot_download(\n    "{REPO_ID}"' in python and '"local-dir:" + path + "/fold_1"' in python
    assert "hf-hub:" not in python + "\n".join(_code_blocks(text, "bash"))
    assert f'`timm.create_model("hf-hub:{REPO_ID}")` does **not** load it' in text
    assert "first member's domain guard (`fold_1/domain_guard.safetensors`)" in text

    # A rerun replaces its own staging (the member subfolders included); a foreign folder is refused.
    (staged / "fold_2" / "model.safetensors").write_bytes(b"edited")
    push_model(run, REPO_ID, dry_run=True, out=staged)
    assert _tree_hashes(staged)["fold_2/model.safetensors"] == before["fold_2/best/model.safetensors"]
    assert not (staged / "eval").exists()
    (staged / "fold_2" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="choose a new folder"):
        push_model(run, REPO_ID, dry_run=True, out=staged)
    assert (staged / "fold_2" / "notes.txt").read_text() == "mine"


def test_other_member_folders_are_renamed_member_k(run: Path, tmp_path: Path) -> None:
    from derm_accel.hub.push import push_model
    from derm_accel.models.ensemble import load_models, write_ensemble

    other = tmp_path / "picked"
    shutil.copytree(run / "fold_2" / "best", other / "b3")
    shutil.copytree(run / "fold_1" / "best", other / "older" / "effnet")
    write_ensemble(other, ["b3", "older/effnet"])
    staged = Path(push_model(other, REPO_ID, dry_run=True, out=tmp_path / "staged"))
    assert json.loads((staged / "ensemble.json").read_text())["members"] == ["member_1", "member_2"]
    assert set(_tree_hashes(staged)) == {"README.md", "ensemble.json", "member_2/domain_guard.safetensors"} | {
        f"member_{k}/{name}" for k in (1, 2) for name in MEMBER_FILES
    }
    text = (staged / "README.md").read_text()
    assert '"local-dir:" + path + "/member_1"' in text and "No evaluation report was published" in text
    net, labels = load_models(str(staged))  # the staged repo loads as the ensemble it describes
    assert labels == LABELS and net.member_names == ["staged/member_1", "staged/member_2"]  # shareable names


def test_a_report_evaluate_wrote_for_the_folder_goes_into_the_card(run: Path, tmp_path: Path) -> None:
    from derm_accel.data.synthetic import write_dataset
    from derm_accel.evaluation.run import evaluate_model
    from derm_accel.hub.push import push_model

    data = write_dataset(tmp_path / "data", {"test": [4, 4, 4]}, size=72, names=LABELS)
    metrics = evaluate_model(str(run), data, split="test", out_dir=tmp_path / "report", num_workers=0)
    staged = Path(push_model(run, REPO_ID, report_dir=tmp_path / "report", dry_run=True, out=tmp_path / "staged"))
    text = (staged / "README.md").read_text()
    for name, row in zip(("fold_1", "fold_2"), metrics["ensemble"]["members"], strict=True):
        assert f"| `{name}/` | {row['accuracy']:.3f} | {row['balanced_accuracy']:.3f} | {row['macro_f1']:.3f} |" in text
    assert f"| **ensemble** | **{metrics['accuracy']:.3f}** |" in text
    assert (staged / "eval" / "metrics.json").read_bytes() == (tmp_path / "report" / "metrics.json").read_bytes()


def test_damaged_or_mismatched_members_and_wrong_reports_are_refused(
    run: Path, report: Path, tmp_path: Path
) -> None:
    from derm_accel.hub.push import push_model

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    weights = broken / "fold_2" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"fold_2/best/model\.safetensors is not a readable safetensors"):
        push_model(broken, REPO_ID, dry_run=True, out=tmp_path / "a")

    shutil.copy2(run / "fold_2" / "best" / "model.safetensors", weights)
    config_path = broken / "fold_2" / "best" / "config.json"
    config = json.loads(config_path.read_text())
    config["label_names"] = config["pretrained_cfg"]["label_names"] = list(reversed(LABELS))
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"fold_2/best/config\.json predicts .* same classes in the same order"):
        push_model(broken, REPO_ID, dry_run=True, out=tmp_path / "b")

    single = write_report_dir(tmp_path / "single")  # a report of one model, not of this ensemble
    with pytest.raises(ValueError, match="reports a single model, but this ensemble has 2 members"):
        push_model(run, REPO_ID, report_dir=single, dry_run=True, out=tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_pushed_ensemble_predicts_like_the_local_folder(
    run: Path, report: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real push to the in-repo Hub server; a fresh process predicts by repo id and runs the card's code."""
    import huggingface_hub.constants as hf_constants

    from derm_accel import predict
    from derm_accel.data.synthetic import render
    from derm_accel.hub.push import push_model

    images = tmp_path / "photos"
    images.mkdir()
    paths = []
    for i in range(3):
        render(i, seed=10 + i, size=80).save(images / f"img{i}.jpg")
        paths.append(str(images / f"img{i}.jpg"))
    shutil.copy2(paths[0], images / "lesion.jpg")  # the file name the card's examples use
    local = predict(paths, model=str(run), top_k=3, device="cpu")

    with LocalHubServer(token=TOKEN) as hub:
        with monkeypatch.context() as m:
            m.setattr(hf_constants, "ENDPOINT", hub.url)
            m.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
            url = push_model(run, REPO_ID, report_dir=report, token=TOKEN)
        assert url == f"{hub.url}/{REPO_ID}"
        staged = Path(push_model(run, REPO_ID, report_dir=report, dry_run=True, out=tmp_path / "staged"))
        remote = hub.state.files(REPO_ID)
        remote.pop(".gitattributes")
        assert remote == _tree_hashes(staged)
        card = hub.state.read(REPO_ID, "README.md").decode()
        card_code = "\n".join(_code_blocks(card, "python"))
        code = f"""
import json, os, sys
from derm_accel import predict
out = {{"predict": predict({paths!r}, model={REPO_ID!r}, top_k=3, device="cpu")}}
os.chdir({str(images)!r})
exec({card_code!r})  # the card's loading examples, as written
out["ensemble_members"] = len(net.members)
out["member_labels"] = labels
print("OUT=" + json.dumps(out))
"""
        start = len(hub.request_log)
        proc = run_python(code, hub_env(hub.url, tmp_path / "hf_home", HF_TOKEN=TOKEN), timeout=180)
        downloads = [line.split()[1] for line in hub.request_log[start:] if "/resolve/" in line]

    out = json.loads(proc.stdout.split("OUT=")[1].splitlines()[0])
    assert out["ensemble_members"] == 2 and out["member_labels"] == LABELS
    # Only ensemble.json and the members' JSON and safetensors files were read from the Hub.
    assert downloads and all(p.endswith((".json", ".safetensors")) for p in downloads), downloads
    assert any(p.endswith("/fold_2/model.safetensors") for p in downloads)
    for a, b in zip(out["predict"], local, strict=True):
        assert a["label"] == b["label"] and a["in_domain"] == b["in_domain"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
        assert {t["label"]: t["probability"] for t in a["top_k"]} == pytest.approx(
            {t["label"]: t["probability"] for t in b["top_k"]}, abs=1e-5
        )


def test_cli_push_dry_run_of_an_ensemble(run: Path, report: Path, tmp_path: Path) -> None:
    typer_testing = pytest.importorskip("typer.testing")
    from derm_accel.cli import app

    runner = typer_testing.CliRunner()
    out = tmp_path / "staged"
    args = ["push", str(run), "--repo-id", REPO_ID, "--report", str(report), "--dry-run", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "ensemble.json").is_file() and (out / "fold_2" / "model.safetensors").is_file()
    result = runner.invoke(app, [*args[:-1], str(tmp_path / "x"), "--space", "derm-lab/tiny-derm-cv-demo"])
    assert result.exit_code != 0 and "--space" in result.output
    assert not (tmp_path / "x").exists()
    help_text = runner.invoke(app, ["push", "--help"], terminal_width=200).output
    assert "ensemble" in help_text and "runs/cv5" in help_text
