"""Shared fixtures: paths to the real sample data and weights beside the checkout, and small generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DERM_SAMPLE = SHARED / "data" / "derm-sample"
LITE0_WEIGHTS = SHARED / "weights" / "efficientnet_lite0.in1k"

needs_derm_sample = pytest.mark.skipif(
    not DERM_SAMPLE.is_dir(),
    reason=f"real dermoscopic sample not found at {DERM_SAMPLE} (it lies in shared/ beside the checkout)",
)
needs_lite0 = pytest.mark.skipif(
    not (LITE0_WEIGHTS / "model.safetensors").is_file(),
    reason=f"ImageNet EfficientNet-Lite0 weights not found at {LITE0_WEIGHTS}",
)

# Keep the suite polite on a 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def sample_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated class-folder tree (4 classes x 12 images, 64 px) shared by the session."""
    from derm_accel.data.synthetic import write_sample

    return write_sample(tmp_path_factory.mktemp("sample"), num_classes=4, per_class=12, size=64, seed=0)
