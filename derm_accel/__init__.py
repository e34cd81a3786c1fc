"""derm-accel: skin-disease image classifiers from class folders to the Hugging Face Hub.

``from derm_accel import load_model, predict`` is all a user needs to run a trained model. The package import
stays light: torch and timm load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# predict.py imports nothing heavy at module level; binding the function here also keeps the name `predict`
# pointing at the function rather than at the submodule of the same name.
from derm_accel.predict import predict

if TYPE_CHECKING:
    from derm_accel.ensemble import load_models
    from derm_accel.models import load_model

__version__ = "0.1.0"
__all__ = ["__version__", "load_model", "load_models", "predict"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from derm_accel.models import load_model

        return load_model
    if name == "load_models":  # one model, several (an ensemble), or an ensemble folder / repo
        from derm_accel.ensemble import load_models

        return load_models
    raise AttributeError(f"module 'derm_accel' has no attribute {name!r}")
