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
import os
from pathlib import Path

import numpy as np
import torch

from derm_accel.core.errors import RunError
from derm_accel.core.fileio import atomic_write_json, staged_dir
from derm_accel.core.paths import shareable_path
from derm_accel.models.build import data_config
from derm_accel.models.load import load_model

ONNX_NAME = "model.onnx"
SIDECAR_NAME = "preprocessing.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
PARITY_ATOL = 1e-4
FORMATS = ("onnx",)
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


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
            "preprocessing_note": "timm's eval transform: resize the shorter side to input_size / crop_pct, centre "
            "crop to input_size, scale to [0, 1], subtract mean, divide by std "
            "(timm.data.create_transform(**preprocessing))",
            "parity": {"max_abs_probability_diff": diff, "batch": check_batch, "inputs": "random normal"},
            "exported_from": shareable_path(model_source) if Path(model_source).exists() else str(model_source),
            "torch_version": torch.__version__,
            "onnxruntime_version": ort.__version__,
            "domain_guard": None,  # the guard stays in PyTorch; ONNX results carry none
        }
        atomic_write_json(tmp / SIDECAR_NAME, sidecar)
    return out_dir


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
        self.meta = json.loads((folder / SIDECAR_NAME).read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / ONNX_NAME), options, providers=["CPUExecutionProvider"])
        self.labels = list(self.meta["label_names"])
        self.pretrained_cfg = dict(self.meta["preprocessing"], num_classes=len(self.labels), label_names=self.labels)
        self.default_cfg = self.pretrained_cfg
        self.num_classes = len(self.labels)
        self.default_tta = self.meta.get("tta")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    def eval(self) -> OnnxClassifier:
        return self
