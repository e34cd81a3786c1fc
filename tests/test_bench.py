"""Benchmarks (scripts in benchmarks/, outside the package) run end to end on toy settings: valid JSON, docs
tables rewritten in place only when asked, GPU check dry mode.

Speed itself is never asserted here (benchmark scripts measure it); these tests check the logic around it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import as_bools, markers, parse_size, update_docs_section
from benchmarks.ddp_comm import MIB, ddp_buckets, simulate_step
from benchmarks.harness import KINDS, build_parser, run_bench
from benchmarks.infer import recommend

REPO = Path(__file__).resolve().parents[1]
TOY = {"model": "test_efficientnet", "img_size": 32}


@pytest.fixture(autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _section(docs: Path, kind: str) -> str:
    text = docs.read_text()
    start, end = markers(kind)
    assert text.count(start) == 1 and text.count(end) == 1
    return text[text.index(start) : text.index(end)]


def test_data_bench_writes_json_and_rewrites_docs_in_place(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nHand-written intro.\n")
    opts = dict(
        sizes="96x72",
        images=8,
        workers="1",
        batch_size=4,
        img_size=32,
        model="test_efficientnet",
        workdir=tmp_path / "cache",
        repeats=1,
        command="derm-accel bench data --images 8",
    )
    res = run_bench("data", out=tmp_path / "data.json", docs=docs, **opts)
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved["kind"] == "data" and saved["command"] == "derm-accel bench data --images 8"
    assert {"cpu", "usable_cores", "torch", "pillow"} <= saved["machine"].keys()
    rows = {r["pipeline"]: r for r in saved["results"]}
    assert set(rows) == {"original", "folder_draft", "arrow", "arrow_uint8"}
    assert all(r["images_per_s"] > 0 and r["dataset_size"] == 8 and r["workers"] == 1 for r in rows.values())
    assert rows["original"]["speedup_vs_original"] == 1.0
    assert rows["arrow"]["speedup_vs_original"] == pytest.approx(
        rows["arrow"]["images_per_s"] / rows["original"]["images_per_s"], rel=0.01
    )
    assert res["summary"]["arrow_speedup_vs_original"]["96x72/1w"] == rows["arrow"]["speedup_vs_original"]
    section = _section(docs, "data")
    assert "derm-accel bench data --images 8" in section and "| 96x72 | arrow | 1 |" in section
    # A second run replaces the section, keeps the text around it.
    run_bench("data", out=tmp_path / "data.json", docs=docs, **{**opts, "command": "second run"})
    assert "second run" in _section(docs, "data") and "--images 8" not in _section(docs, "data")
    assert docs.read_text().startswith("# Benchmarks\n\nHand-written intro.\n")


def test_steps_bench_times_each_step_both_ways(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    opts = dict(images=12, source_size="96x72", img_size=32, model="test_efficientnet", repeats=1)
    run_bench("steps", out=tmp_path / "steps.json", docs=docs, workdir=tmp_path / "cache", **opts)
    saved = json.loads((tmp_path / "steps.json").read_text())
    assert [r["step"] for r in saved["results"]] == ["decode", "augment", "seed", "eval input"]
    for r in saved["results"]:
        assert r["earlier_ms"] > 0 and r["current_ms"] > 0
        assert r["speedup"] == pytest.approx(r["earlier_ms"] / r["current_ms"], rel=0.02)
    total = sum(r["current_ms"] for r in saved["results"][:3])
    assert saved["summary"]["current_ms"] == pytest.approx(total, rel=1e-3)
    assert saved["settings"]["decode_min_size"] == 55  # what train decodes to for 32 px crops at scale >= 0.35
    assert "| seed | torch.manual_seed in fork_rng |" in _section(docs, "steps")


def test_uint8_transform_matches_train_transform_up_to_normalisation():
    from PIL import Image

    from benchmarks.data import model_data_config, uint8_train_transform
    from derm_accel.data.transforms import train_transform

    cfg = model_data_config("test_efficientnet", 32)
    image = Image.new("RGB", (60, 40), (200, 100, 50))  # flat colour: crops and flips cannot change pixels
    u8 = uint8_train_transform(cfg)(image)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    assert torch.allclose((u8.float() / 255 - mean) / std, train_transform(cfg)(image), atol=1e-5)


def test_train_bench_reports_rate_memory_and_compile_time(tmp_path):
    res = run_bench(
        "train",
        out=tmp_path / "train.json",
        docs=tmp_path / "b.md",
        models="test_efficientnet",
        img_size=32,
        batch_size=2,
        steps=1,
        warmup=1,
        channels_last="on",
        compile="off",
        device="cpu",
        isolate=False,
    )
    (row,) = json.loads((tmp_path / "train.json").read_text())["results"]
    assert row["model"] == "test_efficientnet" and row["channels_last"] is True and row["compile"] is False
    assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] is None
    assert 0 < row["best_step_ms"] <= row["step_ms"] + 0.1  # one timed step: the best is the mean
    assert row["memory_kind"] == "sampled_peak_rss" and row["peak_memory_mb"] > 10
    assert res["summary"]["test_efficientnet"]["best"]["channels_last"] is True
    assert "| test_efficientnet | on | off | none | 2 |" in _section(tmp_path / "b.md", "train")


def test_train_bench_rejects_fp16_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        run_bench(
            "train",
            out=tmp_path / "t.json",
            update_docs=False,
            models="test_efficientnet",
            img_size=32,
            batch_size=2,
            steps=1,
            amp="fp16",
            device="cpu",
            channels_last="off",
            compile="off",
            isolate=False,
        )
    assert not (tmp_path / "t.json").exists()


def test_infer_bench_all_sources_and_recommendation(tmp_path):
    res = run_bench(
        "infer",
        out=tmp_path / "infer.json",
        docs=tmp_path / "b.md",
        **TOY,
        batch_size=4,
        images=8,
        source_size="80x60",
        workers=0,
        channels_last="off,on",
        device="cpu",
        workdir=tmp_path / "cache",
    )
    rows = json.loads((tmp_path / "infer.json").read_text())["results"]
    assert {(r["source"], r["channels_last"]) for r in rows} == {
        (s, c) for s in ("tensor", "arrow", "folder") for c in (False, True)
    }
    assert all(r["images_per_s"] > 0 and r["images_timed"] == 4 and r["dtype"] == "fp32" for r in rows)
    assert res["summary"]["judged_on"] == "arrow"
    assert isinstance(res["summary"]["recommended_channels_last"], bool)
    assert "Recommended defaults" in _section(tmp_path / "b.md", "infer")


def test_recommend_switches_only_on_a_clear_win():
    def row(cl, ips):
        return {
            "source": "arrow",
            "channels_last": cl,
            "dtype": "fp32",
            "compile": False,
            "images_per_s": ips,
        }

    assert recommend([row(False, 100.0), row(True, 102.0)])["recommended_channels_last"] is False
    assert recommend([row(False, 100.0), row(True, 110.0)])["recommended_channels_last"] is True
    # A sweep without channels_last off cannot recommend it, but still judges compile.
    compiled = {**row(True, 130.0), "compile": True}
    rec = recommend([row(True, 100.0), compiled])
    assert rec["recommended_channels_last"] is None and rec["recommended_compile"] is True


def test_ddp_buckets_follow_ddp_rules():
    sizes_mib = (0.75, 0.5, 20, 10)  # in definition order
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(int(n * MIB / 4))) for n in sizes_mib])
    # Default: a 1 MiB bucket for the first-defined parameters, then 25 MiB; reduced last layers first.
    assert [b / MIB for b in ddp_buckets(params)] == [30.0, 1.25]
    # Any other cap applies to every bucket.
    assert [b / MIB for b in ddp_buckets(params, bucket_cap_mb=8)] == [10.0, 21.25]


def test_simulate_step_exposes_only_what_backward_cannot_hide():
    # One 100 MB bucket, ready when backward ends: all of it is exposed. 2 GPUs: ring moves 1x the bytes.
    sim = simulate_step(
        [100_000_000], world_size=2, step_ms=100.0, backward_fraction=0.5, busbw_gbs=10.0, latency_us=0.0
    )
    assert sim["exposed_ms"] == pytest.approx(10.0) and sim["efficiency"] == pytest.approx(100 / 110)
    # Ten 10 MB buckets (1 ms each) ready every 5 ms: all but the last hide behind the rest of backward.
    sim = simulate_step(
        [10_000_000] * 10, world_size=2, step_ms=100.0, backward_fraction=0.5, busbw_gbs=10.0, latency_us=0.0
    )
    assert sim["comm_ms"] == pytest.approx(10.0) and sim["exposed_ms"] == pytest.approx(1.0)


def test_gradients_of_late_layers_are_ready_first():
    from benchmarks.ddp_comm import grad_ready_fractions
    from derm_accel.models.build import create_model

    model = create_model("test_efficientnet", 5)
    fractions = grad_ready_fractions(model, img_size=32)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(fractions) == len(names) and all(0 <= f <= 1 for f in fractions)
    assert fractions[names.index("classifier.weight")] < fractions[names.index("conv_stem.weight")]
    # With measured readiness, buckets ready early hide their all-reduce completely.
    sim = simulate_step(
        [10_000_000, 1_000_000],
        world_size=2,
        step_ms=100.0,
        backward_fraction=0.5,
        busbw_gbs=10.0,
        latency_us=0.0,
        ready=[0.1, 1.0],
    )
    assert sim["exposed_ms"] == pytest.approx(0.1)


def test_comm_bench_counts_parameters(tmp_path):
    res = run_bench("comm", out=tmp_path / "c.json", docs=tmp_path / "b.md", models="test_efficientnet", num_classes=35)
    (row,) = res["results"]
    from derm_accel.models.build import create_model

    n = sum(p.numel() for p in create_model("test_efficientnet", 35).parameters())
    assert row["grad_mb_fp32"] == round(n * 4 / MIB, 1) and row["buckets"] >= 1
    assert row["ring_mb_per_gpu"] == pytest.approx(1.5 * n * 4 / MIB, abs=0.1)
    assert all(0 < v["efficiency"] <= 1 for v in row["efficiency"].values())
    assert "| test_efficientnet |" in _section(tmp_path / "b.md", "comm")


def test_update_docs_creates_then_replaces(tmp_path):
    docs = tmp_path / "sub" / "b.md"
    update_docs_section(docs, "x", "first")
    update_docs_section(docs, "y", "other")
    update_docs_section(docs, "x", "second")
    text = docs.read_text()
    assert "second" in text and "first" not in text and "other" in text
    assert text.index(markers("x")[0]) < text.index(markers("y")[0])


def test_option_parsing():
    assert parse_size("1024x768") == (1024, 768)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("1024")
    assert as_bools("off,on") == [False, True] and as_bools(True) == [True]
    with pytest.raises(ValueError, match="on/off"):
        as_bools("maybe")
    assert build_parser("infer").parse_args(["--compile", "off,on"]).compile == "off,on"
    args = build_parser("train").parse_args(["--channels-last", "off,on", "--batch-size", "2", "--isolate", "off"])
    assert args.channels_last == "off,on" and args.batch_size == 2 and args.isolate is False and args.steps is None
    with pytest.raises(ValueError, match="Unknown benchmark"):
        run_bench("speed")
    assert set(KINDS) == {
        "data", "steps", "train", "infer", "comm", "convert", "dedupe", "guard", "onnx", "subgroups", "scale"
    }


def test_cli_options_are_coerced_to_the_bench_types():
    from benchmarks.harness import coerce_options
    from benchmarks.infer import bench_infer
    from benchmarks.train import bench_train

    assert coerce_options(bench_infer, {"compile": "off,on"}) == {"compile": "off,on"}
    opts = coerce_options(bench_train, {"model": "resnet18", "batch-size": "8", "isolate": "off", "compile": "off,on"})
    assert opts == {"models": "resnet18", "batch_size": 8, "isolate": False, "compile": "off,on"}
    with pytest.raises(ValueError, match=r"valid options: .*batch_size"):
        coerce_options(bench_train, {"batchsize": "8"})
    with pytest.raises(ValueError, match="expected int"):
        coerce_options(bench_train, {"steps": "many"})


def test_cli_bench_command_runs_the_bench(tmp_path):
    from typer.testing import CliRunner

    from derm_accel.cli import app

    out = tmp_path / "comm.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "comm",
            "--out",
            str(out),
            "--no-update-docs",
            "--opt",
            "models=test_efficientnet",
            "--opt",
            "measure_ready=off",
            "--opt",
            "world_size=2",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["settings"]["world_size"] == 2 and saved["results"][0]["model"] == "test_efficientnet"
    assert saved["results"][0]["bucket_ready_fraction"] is None


def test_gpu_check_loader_without_datasets_decodes_the_same(monkeypatch):
    from torchvision.transforms.v2 import functional as F

    from benchmarks.gpu_check import image_loader, make_jpegs

    items = make_jpegs(4)

    def resize(x):  # deterministic, so the two loaders' batches can be compared whatever their order
        return F.resize(x, [32, 32], antialias=True)

    def contents(loader):
        batch = next(iter(loader))
        pairs = zip(batch["labels"].tolist(), batch["pixel_values"], strict=True)
        return sorted(((label, x.sum().item(), x) for label, x in pairs), key=lambda t: t[:2])

    options = {"img_size": 32, "batch_size": 4, "workers": 0, "pin_memory": False}
    arrow, arrow_source = image_loader(items, resize, **options)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without `datasets`
    plain, plain_source = image_loader(items, resize, **options)
    assert "train_loader" in arrow_source and "datasets not installed" in plain_source
    a, b = contents(arrow), contents(plain)
    assert [x[0] for x in a] == sorted(lab for _, lab in items)
    for (la, _, xa), (lb, _, xb) in zip(a, b, strict=True):
        assert la == lb and xa.shape == (3, 32, 32) and torch.equal(xa, xb)


def test_gpu_check_dry_run(tmp_path):
    env = {
        **os.environ,
        "GPU_CHECK_DRY": "1",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["settings"]["dry"] is True and report["errors"] == {}
    assert [r["amp"] for r in report["train"]] == ["none", "bf16", "fp16"]
    assert report["train"][2]["skipped"] == "fp16 needs a GPU"
    assert [(r["dtype"], r["compile"]) for r in report["infer"]] == [
        ("fp32", False),
        ("bf16", False),
        ("bf16", True),
    ]
    assert report["infer"][0]["images_per_s"] > 0 and "skipped" in report["infer"][2]
    loader = report["loader"]
    assert loader["loader_fed_img_s"] > 0 and loader["synthetic_tensor_img_s"] > 0
    assert loader["fed_vs_synthetic"] == pytest.approx(
        loader["loader_fed_img_s"] / loader["synthetic_tensor_img_s"], rel=0.02
    )
    check = report["bf16_check"]
    assert 0 <= check["top1_agreement"] <= 1 and 0 <= check["max_abs_prob_diff"] <= 0.05 and check["passed"] is True
    assert report["gpu_decode"]["images"] == report["bf16_check"]["images"]
    best_train = max(r["images_per_s"] for r in report["train"] if "images_per_s" in r)
    assert report["versus_targets"]["train_best_over_target"] == round(best_train / 1120, 2)
    assert report["gpu_decode"]["decode_augment_img_s"] > 0
    assert "| infer |" in (tmp_path / "gpu_check.md").read_text()
    assert "wrote" in proc.stdout


def test_a_script_runs_from_the_checkout_and_leaves_the_docs_alone(tmp_path):
    docs = REPO / "docs" / "benchmarks.md"
    before = docs.read_bytes()
    out = tmp_path / "comm.json"
    script = REPO / "benchmarks" / "ddp_comm.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--models", "test_efficientnet", "--out", str(out), "--measure-ready", "off"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["kind"] == "comm" and saved["command"].startswith("python benchmarks/ddp_comm.py --models")
    assert docs.read_bytes() == before and not (tmp_path / "docs").exists()
    assert "updated" not in proc.stdout


def test_subgroups_bench_times_each_size_and_the_previous_implementation(tmp_path):
    out = run_bench("subgroups", out=tmp_path / "s.json", docs=tmp_path / "b.md", sizes="300,600", classes=5,
                    resamples=20, reference_sizes="300")
    first, second = out["results"]["rows"]
    assert (first["images"], second["images"]) == (300, 600)
    assert first["groups"] > 10 and all(r["subgroups_s"] > 0 and r["headline_s"] > 0 for r in (first, second))
    assert first["reference_subgroups_s"] > 0 and second["reference_subgroups_s"] is None
    assert isinstance(out["summary"]["subgroups_exponent"], float)
    text = (tmp_path / "b.md").read_text()
    assert "<!-- bench:subgroups:start -->" in text and "| 600 |" in text and "Fitted growth exponent" in text


def test_scale_bench_fits_exponents_and_prepares_folds_without_decoding(tmp_path):
    from benchmarks.scale import bench_scale, exponent, scale_markdown

    assert exponent([1000, 2000, 4000], [1.0, 2.0, 4.0]) == 1.0
    assert exponent([1000, 4000], [1.0, 16.0]) == 2.0
    assert exponent([1000, 4000], [0.2, 0.5], floor=1.0) == 0.0  # rises under the floor count as flat
    assert exponent([1000], [1.0]) is None
    assert build_parser("scale").parse_args(["--quick"]).quick is True

    results = bench_scale(stages="kfold", kfold_sizes="300,600", workdir=str(tmp_path))
    rows = results["results"]
    assert [r["rows"] for r in rows] == [300, 600] and all("error" not in r for r in rows)
    for r in rows:  # groups read from the stored column; folds are index lists, not copies
        assert r["images_decoded"] == 0 and r["arrow_files_in_fold_data"] == 0 and r["folds"] == 5
        assert r["fold_data_mb"] < r["dataset_mb"]
    assert results["summary"]["kfold"]["time_exponent"] is not None
    table = scale_markdown({**results, "created": "now", "command": "python benchmarks/scale.py",
                            "machine": {"cpu": "cpu", "usable_cores": 2, "torch": "t", "torchvision": "v",
                                        "pillow": "p"}})
    assert "k-fold preparation at 600 rows: 0 images decoded, 0 Arrow files" in table
