"""convert --push-to-hub: the splits, card and report reach a (local) Hub dataset repo and load back from it."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.hub_fixtures import hub_env, run_python
from tests.hub_server import LocalHubServer

TOKEN = "hf_derm" + "DataSecret" + "7c2e9a4b1d6f3058"  # never a real token
REPO_ID = "org/derm-data"
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory):
    """Convert and push in one interpreter (DEBUG logs), read back through the Hub in a fresh one."""
    from derm_accel.data.synthetic import write_sample

    root = tmp_path_factory.mktemp("convert_push")
    src = write_sample(root / "src", num_classes=3, per_class=6, size=48)
    out = root / "out"
    hub = LocalHubServer(token=TOKEN, storage_dir=root / "server").start()
    push_code = f"""
import json, logging
logging.basicConfig(level=logging.DEBUG)
from derm_accel.data.convert import convert_folders
report = convert_folders({str(src)!r}, {str(out)!r}, push_to_hub={REPO_ID!r}, progress=False, license="cc-by-4.0")
print("HUB_URL=" + json.dumps(report["hub_url"]))
"""
    env = dict(HF_TOKEN=TOKEN, HF_HUB_VERBOSITY="debug", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    push = run_python(push_code, hub_env(hub.url, root / "hf_home", **env))
    read_code = f"""
import json
from pathlib import Path
from datasets import load_dataset, load_from_disk
from huggingface_hub import snapshot_download
remote = load_dataset({REPO_ID!r})
local = load_from_disk({str(out)!r})
snapshot = Path(snapshot_download({REPO_ID!r}, repo_type="dataset"))
def summary(d):
    return {{s: {{"rows": d[s].num_rows, "labels": d[s].features["label"].names,
                 "hashes": sorted(d[s]["content_hash"]), "label_counts": sorted(d[s]["label"])}} for s in d}}
print("READ=" + json.dumps({{
    "remote": summary(remote), "local": summary(local),
    "snapshot": sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()),
    "remote_columns": remote["train"].column_names, "local_columns": local["train"].column_names,
}}))
"""
    read = run_python(read_code, hub_env(hub.url, root / "hf_home_reader", HF_TOKEN=TOKEN))
    yield hub, push, json.loads(read.stdout.split("READ=")[1]), out, root
    hub.stop()


def _card_meta(hub: LocalHubServer) -> tuple[dict, str]:
    text = hub.state.read(REPO_ID, "README.md", repo_type="dataset").decode()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_repo_holds_parquet_splits_card_and_report(pushed) -> None:
    hub, push, read, out, _ = pushed
    assert json.loads(push.stdout.split("HUB_URL=")[1]) == f"{hub.url}/datasets/{REPO_ID}"
    assert REPO_ID not in hub.state.repos  # a dataset repo, not a model repo of the same name
    files = hub.state.files(REPO_ID, repo_type="dataset")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(SPLITS)
    parquet = sorted(p for p in files if p.endswith(".parquet"))
    assert [p.split("/")[1].split("-")[0] for p in parquet] == sorted(SPLITS)
    assert all(p.startswith("data/") for p in parquet)
    assert {"README.md", "conversion_report.json", ".gitattributes"} | set(parquet) == set(files)
    # The data went through LFS; the report is byte-identical to the local one.
    last = hub.state.history(REPO_ID, repo_type="dataset")[0]
    assert all(last.files[p].sha256 is not None for p in parquet)
    report = hub.state.read(REPO_ID, "conversion_report.json", repo_type="dataset")
    assert report == (out / "conversion_report.json").read_bytes()
    assert json.loads(report)["push_to_hub"] == REPO_ID
    assert [c.title for c in hub.state.history(REPO_ID, repo_type="dataset")] == [
        "Conversion report: every source file and what happened to it",
        "Dataset card from the conversion report",
        "Upload images converted by derm-accel",
        "initial commit",
    ]
    # snapshot_download sees exactly the repo's files.
    assert read["snapshot"] == sorted(files)


def test_card_keeps_datasets_metadata_and_adds_ours(pushed) -> None:
    hub, _, read, out, _ = pushed
    meta, body = _card_meta(hub)
    assert meta["license"] == "cc-by-4.0"
    assert meta["task_categories"] == ["image-classification"]
    assert {"dermatology", "medical-imaging", "derm-accel"} <= set(meta["tags"])
    assert meta["size_categories"] == "n<1K"
    # What datasets' push_to_hub wrote: configs pointing at the parquet files, and the features with label names.
    (config,) = meta["configs"]
    assert config["config_name"] == "default"
    assert {f["split"]: f["path"] for f in config["data_files"]} == {s: f"data/{s}-*" for s in SPLITS}
    info = meta["dataset_info"]
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == {s: read["local"][s]["rows"] for s in SPLITS}
    label = next(f for f in info["features"] if f["name"] == "label")
    names = label["dtype"]["class_label"]["names"]
    assert [names[k] for k in sorted(names, key=int)] == read["local"]["train"]["labels"]
    assert "# Skin disease images" in body
    assert body.strip() == (out / "README.md").read_text().split("---\n", 2)[2].strip()


def test_load_dataset_from_the_hub_matches_load_from_disk(pushed) -> None:
    _, _, read, _, _ = pushed
    remote, local = read["remote"], read["local"]
    assert set(remote) == set(local) == set(SPLITS)
    labels = local["train"]["labels"]
    assert len(labels) == 3 and labels == sorted(labels)
    for split in SPLITS:
        assert remote[split]["rows"] == local[split]["rows"] > 0
        assert remote[split]["labels"] == labels
        # Same images in the same split with the same labels, not just the same counts.
        assert remote[split]["hashes"] == local[split]["hashes"]
        assert remote[split]["label_counts"] == local[split]["label_counts"]
    assert sum(local[s]["rows"] for s in SPLITS) == 3 * 6
    assert read["remote_columns"] == read["local_columns"]


def test_token_is_never_printed_logged_or_written(pushed) -> None:
    hub, push, _, _, root = pushed
    # The push really ran with DEBUG logging of huggingface_hub and the HTTP client.
    assert "preupload" in push.stderr and "/api/datasets/" in push.stderr
    output = push.stdout + push.stderr
    assert TOKEN not in output and TOKEN[-8:] not in output
    assert not any(TOKEN in line for line in hub.request_log)
    # Every file written: OUT, both HF_HOMEs (caches), the server's stored objects and metadata.
    assert (root / "server" / "repos.json").is_file()
    leaked = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []
