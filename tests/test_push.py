"""Push: staging, a real upload to a local Hub server, timm-only loading, retries, token hygiene."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import yaml

from tests.conftest import DERM_SAMPLE
from tests.hub_fixtures import ARCH, LABELS, hub_env, run_python, write_model_dir, write_report_dir
from tests.hub_server import LocalHubServer

TOKEN = "hf_derm" + "TestSecret" + "9f3a7c1e5b2d4680"  # never a real token
REPO_ID = "derm-lab/tiny-derm"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    return write_model_dir(root, guard=True), write_report_dir(root)


@pytest.fixture(scope="module")
def eval_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real dermoscopic images when the shared sample is present, generated lesions otherwise."""
    if DERM_SAMPLE.is_dir():
        return [sorted(d.glob("*.jpg"))[0] for d in sorted(DERM_SAMPLE.iterdir()) if d.is_dir()][:4]
    from derm_accel.data.synthetic import render

    out = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(4):
        render(i % 4, seed=i, size=96).save(out / f"img{i}.jpg")
        paths.append(out / f"img{i}.jpg")
    return paths


@pytest.fixture(scope="module")
def clean_push(artifacts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """Push twice in a fresh interpreter (HF_ENDPOINT set before huggingface_hub's import), DEBUG logs."""
    model_dir, report_dir = artifacts
    root = tmp_path_factory.mktemp("clean")
    hub = LocalHubServer(token=TOKEN, storage_dir=root / "server").start()
    code = f"""
import logging, json
logging.basicConfig(level=logging.DEBUG)
import derm_accel.hub.push as hub
urls = [hub.push_model({str(model_dir)!r}, {REPO_ID!r}, report_dir={str(report_dir)!r}) for _ in range(2)]
print("URLS=" + json.dumps(urls))
"""
    env = hub_env(hub.url, root / "hf_home", HF_TOKEN=TOKEN, HF_HUB_VERBOSITY="debug")
    proc = run_python(code, env)
    yield hub, proc, root
    hub.stop()


def test_dry_run_stages_exactly_the_upload_without_network(
    artifacts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import ModelCard

    from derm_accel.hub.push import push_model

    def no_network(*args, **kwargs):
        raise AssertionError("dry run opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model_dir, report_dir = artifacts
    before = _tree_hashes(model_dir)
    out = push_model(model_dir, REPO_ID, report_dir=report_dir, dry_run=True, out=tmp_path / "staged")
    staged = Path(out)
    assert staged == tmp_path / "staged"
    files = set(_tree_hashes(staged))
    expected_eval = {f"eval/{p.name}" for p in report_dir.iterdir()}
    assert (
        files
        == {
            "README.md",
            "model.safetensors",
            "config.json",
            "recipe.yaml",
            "training_info.json",
            "val_metrics.json",
            "domain_guard.safetensors",
        }
        | expected_eval
    )
    # Byte-identical copies, and the source folder is untouched.
    assert _sha256(staged / "model.safetensors") == _sha256(model_dir / "model.safetensors")
    assert _sha256(staged / "eval/metrics.json") == _sha256(report_dir / "metrics.json")
    assert _tree_hashes(model_dir) == before
    # A copy, not a hard link: editing the staged folder must not change the run.
    assert (staged / "config.json").stat().st_ino != (model_dir / "config.json").stat().st_ino
    config = json.loads((staged / "config.json").read_text())
    assert config["architecture"] == ARCH and config["label_names"] == LABELS
    card = ModelCard.load(staged / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "cc-by-nc-4.0"


def test_dry_run_out_folder_rules(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    from derm_accel.hub.push import push_model

    model_dir, _ = artifacts
    with pytest.raises(ValueError, match="--out"):
        push_model(model_dir, REPO_ID, dry_run=True)
    with pytest.raises(ValueError, match="--dry-run"):
        push_model(model_dir, REPO_ID, out=tmp_path / "staged")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("keep me")
    with pytest.raises(ValueError, match="choose a new folder"):
        push_model(model_dir, REPO_ID, dry_run=True, out=tmp_path / "busy")
    assert (tmp_path / "busy" / "x.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging leftovers
    # A previous staging is replaced as a whole (a file no longer staged disappears).
    staged = Path(push_model(model_dir, REPO_ID, dry_run=True, out=tmp_path / "again"))
    (staged / "eval").mkdir()
    (staged / "eval" / "old.png").write_bytes(b"old")
    push_model(model_dir, REPO_ID, dry_run=True, out=staged)
    assert not (staged / "eval").exists() and (staged / "README.md").is_file()


def test_push_rejects_bad_inputs_before_any_upload(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    from derm_accel.hub.push import push_model

    model_dir, _ = artifacts
    with pytest.raises(ValueError, match=r"ORG/NAME|valid Hub repo id"):
        push_model(model_dir, "no-namespace", dry_run=True, out=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"metrics\.json"):
        push_model(model_dir, REPO_ID, report_dir=tmp_path, dry_run=True, out=tmp_path / "b")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        push_model(broken, REPO_ID, dry_run=True, out=tmp_path / "c")
    unlicensed = write_model_dir(tmp_path / "unlicensed", license=None)
    with pytest.raises(ValueError, match="--license"):
        push_model(unlicensed, REPO_ID, dry_run=True, out=tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_push_uploads_everything_and_repush_makes_no_commit(
    clean_push, artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    from derm_accel.hub.push import push_model

    hub, proc, _ = clean_push
    model_dir, report_dir = artifacts
    urls = json.loads(proc.stdout.split("URLS=")[1])
    assert urls == [f"{hub.url}/{REPO_ID}"] * 2
    staged = Path(push_model(model_dir, REPO_ID, report_dir=report_dir, dry_run=True, out=tmp_path / "staged"))
    remote = hub.state.files(REPO_ID)
    assert remote.pop(".gitattributes")
    assert remote == _tree_hashes(staged)
    # The weights went through LFS, the card as a regular file.
    last = hub.state.history(REPO_ID)[0]
    assert last.files["model.safetensors"].sha256 == _sha256(model_dir / "model.safetensors")
    assert last.files["README.md"].sha256 is None
    # Initial commit + one upload: the identical second push created no (empty) commit.
    assert [c.title for c in hub.state.history(REPO_ID)] == [
        "Upload tiny-derm with derm-accel 0.1.0",
        "initial commit",
    ]
    assert hub.calls.count("commit") == 1


def test_timm_alone_loads_the_pushed_model_with_identical_logits(
    clean_push, artifacts: tuple[Path, Path], eval_images: list[Path]
) -> None:
    import timm
    import torch
    from PIL import Image

    hub, _, root = clean_push
    model_dir, _ = artifacts
    code = f"""
import json, sys
import timm, torch
from PIL import Image
model = timm.create_model("hf-hub:{REPO_ID}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
x = torch.stack([transform(Image.open(p).convert("RGB")) for p in {[str(p) for p in eval_images]!r}])
with torch.no_grad():
    logits = model(x)
assert "derm_accel" not in sys.modules, "timm-only load imported derm_accel"
print("OUT=" + json.dumps({{"logits": logits.tolist(), "labels": model.pretrained_cfg["label_names"],
                           "input_size": list(model.pretrained_cfg["input_size"])}}))
"""
    proc = run_python(code, hub_env(hub.url, root / "hf_home_reader", HF_TOKEN=TOKEN))
    out = json.loads(proc.stdout.split("OUT=")[1])
    assert out["labels"] == LABELS
    assert out["input_size"] == [3, 64, 64]

    local = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=local))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in eval_images])
    with torch.no_grad():
        expected = local(x)
    got = torch.tensor(out["logits"])
    assert got.shape == (len(eval_images), len(LABELS))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_hub_download_keeps_the_domain_guard(
    clean_push, artifacts: tuple[Path, Path], eval_images: list[Path]
) -> None:
    from derm_accel.inference.predict import predict

    hub, _, root = clean_push
    model_dir, _ = artifacts
    code = f"""
import json
from derm_accel import predict
print("OUT=" + json.dumps(predict({[str(p) for p in eval_images]!r}, model={REPO_ID!r}, device="cpu")))
"""
    proc = run_python(code, hub_env(hub.url, root / "hf_home_guard", HF_TOKEN=TOKEN))
    remote = json.loads(proc.stdout.split("OUT=")[1])
    local = predict([str(p) for p in eval_images], model=str(model_dir), device="cpu")
    assert all(isinstance(r["ood_score"], float) and isinstance(r["in_domain"], bool) for r in remote)
    for a, b in zip(remote, local, strict=True):
        assert a["label"] == b["label"] and a["in_domain"] == b["in_domain"]
        assert a["ood_score"] == pytest.approx(b["ood_score"], rel=1e-4, abs=1e-3)


def test_card_on_the_hub_parses_and_holds_the_metrics(clean_push) -> None:
    from huggingface_hub import ModelCard

    hub, _, _ = clean_push
    text = hub.state.read(REPO_ID, "README.md").decode()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"dermatology", "medical", "timm", "image-classification"} <= set(meta["tags"])
    card = ModelCard(text)
    by_name = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert by_name["Accuracy"] == pytest.approx(0.7838)
    assert by_name["Macro F1"] == pytest.approx(0.7093)
    assert all(r.dataset_split == "test" for r in card.data.eval_results)


def test_token_is_never_printed_logged_or_written(clean_push) -> None:
    hub, proc, root = clean_push
    # The push really ran with DEBUG logging of huggingface_hub and the HTTP client.
    assert "huggingface_hub" in proc.stderr and "preupload" in proc.stderr
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    assert TOKEN[-8:] not in proc.stdout + proc.stderr
    assert not any(TOKEN in line for line in hub.request_log)
    # Every file written: the push's HF_HOME, the reader's cache, the server's stored objects and metadata.
    assert (root / "server" / "repos.json").is_file()
    assert _files_containing(root, TOKEN.encode()) == []


def test_interrupted_push_then_retry_ends_like_a_clean_push(
    clean_push, artifacts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The commit fails once (500), then is applied but its answer is lost; an LFS upload drops once too."""
    import huggingface_hub.constants as hf_constants

    import derm_accel.hub.push as hub_module
    import derm_accel.hub.upload as upload_module

    clean_hub, _, _ = clean_push
    model_dir, report_dir = artifacts
    with LocalHubServer(token=TOKEN) as faulty:
        monkeypatch.setattr(hf_constants, "ENDPOINT", faulty.url)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(upload_module, "RETRY_BASE_DELAY_S", 0.01)
        faulty.fail_next("lfs-upload", mode="drop")
        faulty.fail_next("commit", mode="error", status=500)
        faulty.fail_next("commit", mode="drop_after")
        url = hub_module.push_model(model_dir, REPO_ID, report_dir=report_dir, token=TOKEN)
        assert url == f"{faulty.url}/{REPO_ID}"
        # Two commit requests: the 500 did nothing, the dropped one was applied; the 3rd had nothing to do.
        assert faulty.attempts.count("commit") == 2 and faulty.calls.count("commit") == 1
        assert faulty.attempts.count("lfs-upload") == faulty.calls.count("lfs-upload") + 1
        assert faulty.state.files(REPO_ID) == clean_hub.state.files(REPO_ID)
        titles = [c.title for c in faulty.state.history(REPO_ID)]
        assert titles == [c.title for c in clean_hub.state.history(REPO_ID)]


def test_auth_failure_is_clear_and_keeps_local_files(
    artifacts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf_constants

    from derm_accel.hub.push import push_model
    from derm_accel.hub.upload import PushError

    model_dir, report_dir = artifacts
    before = _tree_hashes(model_dir)
    wrong = TOKEN[::-1]
    with LocalHubServer(token=TOKEN) as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        with pytest.raises(PushError) as info:
            push_model(model_dir, REPO_ID, report_dir=report_dir, token=wrong)
        assert REPO_ID not in hub.state.repos
    message = str(info.value)
    assert "HTTP 401" in message and "--token" in message and "HF_TOKEN" in message
    assert wrong not in message and TOKEN not in message
    assert _tree_hashes(model_dir) == before


def test_network_failure_is_retried_then_reported(
    artifacts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf_constants

    import derm_accel.hub.push as hub_module
    import derm_accel.hub.upload as upload_module

    model_dir, _ = artifacts
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", dead)
    monkeypatch.setattr(upload_module, "RETRY_BASE_DELAY_S", 0.01)
    before = _tree_hashes(model_dir)
    with pytest.raises(upload_module.PushError, match=r"after 4 attempts \(ConnectError") as info:
        hub_module.push_model(model_dir, REPO_ID, token=TOKEN)
    assert "run the same push again" in str(info.value) and TOKEN not in str(info.value)
    assert _tree_hashes(model_dir) == before


def test_push_to_a_branch_leaves_main_alone(artifacts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    from derm_accel.hub.push import push_model

    model_dir, _ = artifacts
    with LocalHubServer(token=TOKEN) as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        url = push_model(model_dir, REPO_ID, revision="v1", commit_message="first cut", token=TOKEN, private=True)
        assert url == f"{hub.url}/{REPO_ID}/tree/v1"
        assert hub.state.repos[REPO_ID].private
        assert set(hub.state.files(REPO_ID, "main")) == {".gitattributes"}
        assert "model.safetensors" in hub.state.files(REPO_ID, "v1")
        assert hub.state.history(REPO_ID, "v1")[0].title == "first cut"


def test_cli_push_dry_run(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    typer_testing = pytest.importorskip("typer.testing")
    from derm_accel.cli import app

    model_dir, report_dir = artifacts
    runner = typer_testing.CliRunner()
    out = tmp_path / "staged"
    result = runner.invoke(
        app,
        [
            "push",
            str(model_dir),
            "--repo-id",
            REPO_ID,
            "--report",
            str(report_dir),
            "--dry-run",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    assert (out / "README.md").is_file() and (out / "eval" / "metrics.json").is_file()
    unlicensed = write_model_dir(tmp_path / "unlicensed", license=None)
    result = runner.invoke(
        app, ["push", str(unlicensed), "--repo-id", REPO_ID, "--dry-run", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code != 0
    assert "--license" in result.output
