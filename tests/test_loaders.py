"""The training loader: one Arrow read per batch, every sample augmented under its own seed."""

from __future__ import annotations

import pytest
import torch
from datasets import load_from_disk

from derm_accel.data.loaders import SeededSamples, train_loader
from derm_accel.data.transforms import AugmentConfig, decode_image, train_transform
from tests.train_utils import make_dataset

CFG = {"input_size": (3, 24, 24), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):
    return load_from_disk(str(make_dataset(tmp_path_factory.mktemp("loaders") / "ds", size=48)))["train"]


def test_batched_read_equals_item_reads_and_seeds_decide_the_augmentation(split) -> None:
    samples = SeededSamples(split, train_transform(CFG, normalize=False))
    keys = [(5, 100), (0, 101), (5, 102), (11, 100)]
    batch = samples.__getitems__(keys)
    for key, sample in zip(keys, batch, strict=True):
        again = samples[key]
        assert torch.equal(sample["pixel_values"], again["pixel_values"]) and sample["labels"] == again["labels"]
        assert sample["pixel_values"].shape == (3, 24, 24) and sample["pixel_values"].dtype == torch.uint8
        assert sample["labels"] == split[key[0]]["label"]
    assert not torch.equal(batch[0]["pixel_values"], batch[2]["pixel_values"])  # same image, other seed
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    samples.__getitems__(keys)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is left as it was


def test_tensor_and_pillow_decoding_give_the_same_batches(split) -> None:
    transform = train_transform(CFG, AugmentConfig(), normalize=False)
    fast = next(iter(train_loader(split, transform, batch_size=8, seed=3)))
    pil = next(iter(train_loader(split, transform, batch_size=8, seed=3, decode=decode_image)))
    assert fast["pixel_values"].shape == (8, 3, 24, 24)
    assert torch.equal(fast["labels"], pil["labels"])
    assert (fast["pixel_values"].int() - pil["pixel_values"].int()).abs().max() <= 1


def test_worker_processes_give_the_in_process_batches(split) -> None:
    transform = train_transform(CFG, normalize=False)
    here = list(train_loader(split, transform, batch_size=8, seed=9))
    workers = list(train_loader(split, transform, batch_size=8, seed=9, num_workers=2))
    assert len(here) == len(workers) == len(split) // 8
    for a, b in zip(here, workers, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
