"""The evaluate stage: batch inference, the shipped ``derm_metrics`` metric module, figures and report."""

from .calibration import fit_temperature, tta_probabilities
from .inference import InferenceResult, predict_logits
from .run import FILES, METRIC_MODULE_DIR, LabelMismatchError, evaluate_model, load_metric

__all__ = [
    "FILES",
    "METRIC_MODULE_DIR",
    "InferenceResult",
    "LabelMismatchError",
    "evaluate_model",
    "fit_temperature",
    "load_metric",
    "predict_logits",
    "tta_probabilities",
]
