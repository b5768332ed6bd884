"""``make demo``: lenet5 on scikit-learn's digits, under policies/hfp8.yaml, under the
trust-region policy (dynamic precision) and under fp32.

Prints the annotated table of the hfp8 model (formats per role, kappa, overflow, SQNR on a
calibration batch), trains the three with progress bars, prints their accuracies side by side and
the trust-region run's precision trajectory (where it raised precision, iterations at each level).
Each run's metrics, plots and checkpoint land in runs/demo/POLICY/.
"""
from __future__ import annotations

import json
from pathlib import Path

import mpcompile
from mpcompile.models import lenet5
from mpcompile.runtime import TrainConfig, load_dataset, train

EPOCHS, LR, BATCH = 20, 0.05, 64


def main() -> None:
    data = load_dataset("digits")
    calibration = data.batch("train", data.train_y.new_tensor(range(256)))[0]
    print(mpcompile.compile(lenet5(), "policies/hfp8.yaml", (calibration,)).table(), "\n")
    results = {}
    for policy in ("policies/hfp8.yaml", "policies/trust_region.yaml", "fp32"):
        name = policy.split("/")[-1].removesuffix(".yaml")
        steps = "trust-region steps of length Delta" if name == "trust_region" else f"SGD lr {LR}"
        print(f"training lenet5 on digits under {name}: {EPOCHS} epochs, {steps}, batch {BATCH}")
        results[name] = train(TrainConfig("lenet5", "digits", policy, EPOCHS, BATCH, LR, out=f"runs/demo/{name}"))
    print(f"\n{'policy':12}  {'test accuracy':>13}  {'train loss':>10}  {'s/epoch':>7}  {'overflow steps':>14}")
    for name, s in results.items():
        print(f"{name:12}  {s['test_accuracy']:13.2%}  {s['train_loss']:10.4f}  {s['seconds_per_epoch']:7.2f}  "
              f"{s['overflow_steps']:14d}")
    tr, eta1 = results["trust_region"], mpcompile.load_policy("policies/trust_region.yaml").trust_region.eta1
    checks = [json.loads(line) for line in Path("runs/demo/trust_region/metrics.jsonl").read_text().splitlines()]
    raises = [f"{c['level']} -> up at iteration {c['check']} (eps {c['eps']:.2g} >= eta1*pred/2 = "
              f"{eta1 * c['pred'] / 2:.2g})" for c in checks if c.get("raised")]
    print(f"\ntrust-region precision trajectory ({sum(tr['levels'].values())} iterations):")
    print("  " + ("\n  ".join(raises) if raises else "no raise: the lowest level met the criterion throughout"))
    print("  iterations per level: " + ", ".join(f"{k} {v}" for k, v in tr["levels"].items())
          + f"; {tr['recompiles']} recompiles, {1e3 * tr['recompile_seconds']:.1f} ms in all")
    print("\nmetrics.jsonl, summary.json, curves.png and checkpoint.pt: runs/demo/{hfp8,trust_region,fp32}/ "
          "(and trust_region.png: loss, Delta and level against iterations)")


if __name__ == "__main__":
    main()
