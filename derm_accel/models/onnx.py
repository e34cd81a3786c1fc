"""ONNX export for deployment with ONNX Runtime, and an ONNX Runtime model that predict can use.

``derm-accel export RUN/best --format onnx OUT`` writes ``OUT/model.onnx`` (float32 ``pixel_values`` NCHW,
already normalised, with a dynamic batch dimension -> ``logits``) and ``OUT/preprocessing.json``, the sidecar
with everything needed around the graph: the label names, the preprocessing timm's eval transform applies
(input size, crop_pct, interpolation, mean, std), the opset and the parity measured at export time.

The graph is traced by torch's ONNX exporter (``torch.export`` + onnxscript, the exporter PyTorch maintains) and
checked against PyTorch on the spot: an export whose probabilities differ by more than ``PARITY_ATOL`` is refused.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from derm_accel.core.errors import InputError, RunError
from derm_accel.core.fileio import atomic_write_json, staged_dir
from derm_accel.core.paths import shareable_path
from derm_accel.models.build import data_config
from derm_accel.models.load import load_model
from derm_accel.models.tta import METHODS as TTA_METHODS
from derm_accel.models.tta import OFF as TTA_OFF

ONNX_NAME = "model.onnx"
SIDECAR_NAME = "preprocessing.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
PARITY_ATOL = 1e-4
FORMATS = ("onnx",)
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's str_to_interp_mode
CROP_MODES = ("center", "squash", "border")  # timm's eval transform
# derm_accel.color_constancy: applied to the whole decoded image before timm's eval transform (derm_accel.data.color)
COLOR_KEY = "color_constancy"


class OnnxExportError(RunError):
    """The exported graph does not reproduce the PyTorch model."""


def _probabilities(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    return torch.as_tensor(np.asarray(logits, dtype=np.float32)).softmax(-1).numpy()


def export_onnx(
    model_source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    check_batch: int = 3,
) -> Path:
    """Export a model folder (RUN/best) or Hub model to ``out_dir``; return ``out_dir``.

    The parity check runs a batch of ``check_batch`` random inputs through both PyTorch and ONNX Runtime (a batch
    size other than the traced one, so the dynamic batch dimension is exercised too).
    """
    import onnxruntime as ort

    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / SIDECAR_NAME).is_file():
        raise FileExistsError(f"{out_dir} exists and is not an ONNX export; choose another OUT folder.")
    net, labels = load_model(os.fspath(model_source))
    cfg = data_config(net)
    size = tuple(cfg["input_size"])
    with staged_dir(out_dir) as tmp:  # an earlier export (checked above) is replaced once this one is complete
        onnx_path = tmp / ONNX_NAME
        with torch.no_grad():
            torch.onnx.export(
                net,
                (torch.zeros(2, *size),),
                str(onnx_path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(check_batch, *size, generator=generator)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = _probabilities(net(x))
        got = _probabilities(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        diff = float(np.abs(got - expected).max())
        if not diff <= PARITY_ATOL:
            raise OnnxExportError(
                f"the ONNX graph's probabilities differ from PyTorch's by {diff:.2e} (> {PARITY_ATOL}); "
                f"the export of {net.pretrained_cfg.get('architecture', type(net).__name__)} is not faithful."
            )
        import onnx

        graph_opset = max(o.version for o in onnx.load(str(onnx_path)).opset_import if o.domain in ("", "ai.onnx"))
        sidecar = {
            "format": "onnx",
            "onnx_file": ONNX_NAME,
            "opset": graph_opset,
            "input": {"name": INPUT_NAME, "shape": ["batch", *size], "dtype": "float32",
                      "layout": "NCHW, RGB, normalised with mean/std below"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", len(labels)], "note": "softmax gives probabilities"},
            "architecture": net.pretrained_cfg.get("architecture"),
            "label_names": labels,
            # derm_accel.tta: the test-time augmentation the model answers with (the graph is one view; the
            # onnxruntime backend of predict averages the flipped views around it)
            "tta": getattr(net, "default_tta", None),
            "preprocessing": {k: cfg[k] for k in PREPROCESSING_KEYS if k in cfg},
            COLOR_KEY: cfg.get(COLOR_KEY),
            "preprocessing_note": _preprocessing_note(cfg.get(COLOR_KEY)),
            "parity": {"max_abs_probability_diff": diff, "batch": check_batch, "inputs": "random normal"},
            "exported_from": shareable_path(model_source) if Path(model_source).exists() else str(model_source),
            "torch_version": torch.__version__,
            "onnxruntime_version": ort.__version__,
            "domain_guard": None,  # the guard stays in PyTorch; ONNX results carry none
        }
        atomic_write_json(tmp / SIDECAR_NAME, sidecar)
    return out_dir


_REEXPORT = "write it again with `derm-accel export MODEL --format onnx OUT`, or fix that key by hand."


class SidecarError(InputError):
    """A preprocessing.json that does not describe its graph, or holds a value predict cannot apply."""


def _graph_dims(session: Any) -> tuple[list[Any], int]:
    """The graph's input shape and its number of outputs per image (probed when the graph leaves it symbolic)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise SidecarError(
            f"the graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}, not '{INPUT_NAME}' -> "
            f"'{OUTPUT_NAME}' as derm-accel exports them; {_REEXPORT}"
        )
    shape = list(inputs[INPUT_NAME].shape)
    classes = outputs[OUTPUT_NAME].shape[-1] if outputs[OUTPUT_NAME].shape else None
    if not isinstance(classes, int):
        if not all(isinstance(d, int) for d in shape[1:]):
            return shape, -1
        probe = np.zeros([1, *shape[1:]], dtype=np.float32)
        classes = int(session.run([OUTPUT_NAME], {INPUT_NAME: probe})[0].shape[-1])
    return shape, classes


def _positive_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_preprocessing(pre: Any, shape: list[Any], bad: Any) -> None:
    if not isinstance(pre, dict):
        bad("preprocessing", pre, "an object with input_size, crop_pct, interpolation, mean and std")
    size = pre.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(d, int) and d > 0 for d in size)):
        bad("preprocessing.input_size", size, "[channels, height, width], three positive integers")
    graph = shape[1:]
    if any(isinstance(g, int) and g != d for g, d in zip(graph, size, strict=False)):
        bad("preprocessing.input_size", size, f"the graph's input shape {graph}")
    crop = pre.get("crop_pct")
    if not (_positive_number(crop) and crop <= 1):
        bad("preprocessing.crop_pct", crop, "a number in (0, 1]")
    if pre.get("interpolation") not in INTERPOLATIONS:
        bad("preprocessing.interpolation", pre.get("interpolation"), f"one of {list(INTERPOLATIONS)}")
    if pre.get("crop_mode", "center") not in CROP_MODES:
        bad("preprocessing.crop_mode", pre.get("crop_mode"), f"one of {list(CROP_MODES)}")
    for key in ("mean", "std"):
        value = pre.get(key)
        finite = isinstance(value, list) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value
        )
        if not finite or len(value) != size[0] or (key == "std" and not all(v > 0 for v in value)):
            bad(f"preprocessing.{key}", value, f"{size[0]} finite numbers" + (", each > 0" if key == "std" else ""))


def check_sidecar(meta: Any, session: Any, path: Path) -> None:
    """Refuse a preprocessing.json that does not fit its graph or holds a value predict cannot apply, naming
    the file and the key: label names (one per output), tta, input size, crop, interpolation, mean and std."""

    def bad(key: str, value: Any, wanted: str) -> None:
        raise SidecarError(f"{path}: key '{key}' is {value!r}, but it must be {wanted}; {_REEXPORT}")

    if not isinstance(meta, dict):
        bad("(top level)", type(meta).__name__, "a JSON object")
    try:
        shape, classes = _graph_dims(session)
    except SidecarError as exc:
        raise SidecarError(f"{path.parent / ONNX_NAME}: {exc}") from None
    labels = meta.get("label_names")
    if not (isinstance(labels, list) and labels and all(isinstance(n, str) and n for n in labels)):
        bad("label_names", labels, "a list of class names")
    if len(set(labels)) != len(labels):
        bad("label_names", labels, "a list of distinct class names")
    if classes >= 0 and len(labels) != classes:
        bad("label_names", f"{len(labels)} names", f"one name per output of the graph ({classes})")
    if meta.get("tta") not in (None, TTA_OFF, *TTA_METHODS):
        bad("tta", meta.get("tta"), f"null or one of {[TTA_OFF, *TTA_METHODS]}")
    _check_preprocessing(meta.get("preprocessing"), shape, bad)
    color = meta.get(COLOR_KEY)
    if color is not None and not (
        isinstance(color, dict) and isinstance(color.get("method"), str) and _positive_number(color.get("power"))
    ):
        bad(COLOR_KEY, color, "null or an object like {\"method\": \"shades_of_gray\", \"power\": 6}")


def _preprocessing_note(color: dict | None) -> str:
    timm_part = (
        "timm's eval transform: resize the shorter side to input_size / crop_pct, centre crop to input_size, "
        "scale to [0, 1], subtract mean, divide by std (timm.data.create_transform(**preprocessing))"
    )
    if not color:
        return timm_part
    return (
        f"first {color['method']} colour constancy (power {color['power']:g}) on the whole decoded RGB image "
        f"(derm_accel.data.color.shades_of_gray, or the numpy lines in the model card), then {timm_part}"
    )


def is_onnx_export(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / ONNX_NAME).is_file() and (path / SIDECAR_NAME).is_file()


class OnnxClassifier:
    """An ONNX Runtime session that predict uses like the PyTorch model: ``net(batch) -> logits`` (a tensor),
    with ``pretrained_cfg`` holding the preprocessing, so timm's ``resolve_data_config`` reads it as usual."""

    guard_note = "the ONNX Runtime backend runs without the domain guard"

    def __init__(self, folder: str | os.PathLike, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        if not is_onnx_export(folder):
            raise FileNotFoundError(
                f"{folder} holds no {ONNX_NAME} + {SIDECAR_NAME}; write one with "
                f"`derm-accel export RUN/best --format onnx {folder}`."
            )
        sidecar = folder / SIDECAR_NAME
        try:
            self.meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise SidecarError(f"{sidecar} is not readable JSON ({exc}); {_REEXPORT}") from exc
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / ONNX_NAME), options, providers=["CPUExecutionProvider"])
        check_sidecar(self.meta, self.session, sidecar)
        self.labels = list(self.meta["label_names"])
        self.pretrained_cfg = dict(self.meta["preprocessing"], num_classes=len(self.labels), label_names=self.labels)
        self.default_cfg = self.pretrained_cfg
        self.num_classes = len(self.labels)
        self.default_tta = None if self.meta.get("tta") in (None, TTA_OFF) else self.meta["tta"]
        self.color_constancy = self.meta.get(COLOR_KEY)  # data_config(self) carries it, as for a torch model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    def eval(self) -> OnnxClassifier:
        return self
