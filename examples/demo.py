"""``make demo``: lenet5 on scikit-learn's digits, under policies/hfp8.yaml and under fp32.

Prints the annotated table of the hfp8 model (formats per role, kappa, overflow, SQNR on a
calibration batch), trains both with progress bars, and prints their accuracies side by side.
Each run's metrics, plots and checkpoint land in runs/demo/POLICY/.
"""
from __future__ import annotations

import mpcompile
from mpcompile.models import lenet5
from mpcompile.runtime import TrainConfig, load_dataset, train

EPOCHS, LR, BATCH = 20, 0.05, 64


def main() -> None:
    data = load_dataset("digits")
    calibration = data.batch("train", data.train_y.new_tensor(range(256)))[0]
    print(mpcompile.compile(lenet5(), "policies/hfp8.yaml", (calibration,)).table(), "\n")
    results = {}
    for policy in ("policies/hfp8.yaml", "fp32"):
        name = policy.split("/")[-1].removesuffix(".yaml")
        print(f"training lenet5 on digits under {name}: {EPOCHS} epochs, SGD lr {LR}, batch {BATCH}")
        results[name] = train(TrainConfig("lenet5", "digits", policy, EPOCHS, BATCH, LR, out=f"runs/demo/{name}"))
    print(f"\n{'policy':8}  {'test accuracy':>13}  {'train loss':>10}  {'s/epoch':>7}  {'overflow steps':>14}")
    for name, s in results.items():
        print(f"{name:8}  {s['test_accuracy']:13.2%}  {s['train_loss']:10.4f}  {s['seconds_per_epoch']:7.2f}  "
              f"{s['overflow_steps']:14d}")
    print("\nmetrics.jsonl, summary.json, curves.png and checkpoint.pt: runs/demo/hfp8/ and runs/demo/fp32/")


if __name__ == "__main__":
    main()
