"""derm-accel: skin-disease image classifiers from class folders to the Hugging Face Hub.

``from derm_accel import load_model, predict`` is all a user needs to run a trained model. The package import
stays light: torch and timm load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The package face only re-exports (nothing inside derm_accel imports it). inference.predict imports nothing
# heavy at module level; the model loaders come on first use (__getattr__).
from derm_accel.core.version import __version__
from derm_accel.inference.predict import predict

if TYPE_CHECKING:
    from derm_accel.models.ensemble import load_models
    from derm_accel.models.load import load_model

__all__ = ["__version__", "load_model", "load_models", "predict"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from derm_accel.models.load import (
            load_model,  # heavy (torch, timm): loaded on first use, `import derm_accel` stays light
        )

        return load_model
    if name == "load_models":  # one model, several (an ensemble), or an ensemble folder / repo
        from derm_accel.models.ensemble import (
            load_models,  # heavy (torch, timm): loaded on first use, `import derm_accel` stays light
        )

        return load_models
    raise AttributeError(f"module 'derm_accel' has no attribute {name!r}")
