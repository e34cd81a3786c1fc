"""The evaluate stage: batch inference, the shipped ``derm_metrics`` metric module, figures and report."""

from derm_accel.evaluation.calibration import fit_temperature, tta_probabilities
from derm_accel.evaluation.inference import InferenceResult, predict_logits
from derm_accel.evaluation.outputs import FILES, METRIC_MODULE_DIR, load_metric
from derm_accel.evaluation.run import LabelMismatchError, evaluate_model

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
