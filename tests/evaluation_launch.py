"""Run evaluate_model from ``accelerate launch`` (used by tests/test_evaluation.py for the two-rank check)."""

from __future__ import annotations

import argparse
import json

import torch

from derm_accel.evaluation import evaluate_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tta", default=None)
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    metrics = evaluate_model(
        args.model,
        args.data,
        out_dir=args.out,
        batch_size=args.batch_size,
        num_workers=0,
        tta=args.tta,
        calibrate=args.calibrate,
        max_thumbnails=4,
    )
    print(json.dumps({"num_samples": metrics["num_samples"], "accuracy": metrics["accuracy"]}))


if __name__ == "__main__":
    main()
