"""HALP against LP-SGD and SGD on a deep model: ``mpcompile train`` runs of lenet5 on digits
(resnet20 on CIFAR-10 where ``--data cifar10 --data-dir DIR`` holds it), 3 seeds, each method
at its best lr of a small grid, training loss and test accuracy per epoch.

    .venv/bin/python examples/halp_deep.py [--seeds 0,1,2] [--lrs 0.03,0.1,0.3] [--epochs 10]
        [--model lenet5 --data digits] [--runs runs/halp_deep] [--plot docs/results/halp_lenet5.png]

The methods (policies written here, each a shipped policy's optimizer section):
- SGD: fp32 weights, momentum 0.9 (the trainer's SGD);
- LP-SGD: the same SGD with the weights stored in fixed(8,5) (8 bits, range [-4, 4), spacing
  1/32) after every step, stochastic rounding (the LP-SGD of the HALP paper);
- SVRG: fp32, T = 1 epoch, no momentum (HALP without its 8-bit offsets, to tell what the
  variance reduction does from what the bits do);
- HALP: ``policies/halp8.yaml``: 8-bit offsets, mu = 1, T = 1 epoch, stochastic rounding; no
  momentum (HALP is SVRG's plain step).
All compute in fp32 (only the stored weights are low precision), batch 32, the trainer's cosine
lr schedule.
The best lr per method is the one with the lowest mean final training loss over the seeds.
About 5 minutes for lenet5 on digits on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from mpcompile.runtime.trainer import TrainConfig, train

POLICIES = {
    "SGD": "version: 1\noptimizer: {kind: sgd}\n",
    "LP-SGD": "version: 1\noptimizer: {kind: sgd, master: 'fixed(8,5)', update_rounding: stochastic}\n",
    "SVRG": "version: 1\noptimizer: {kind: svrg, T: 1 epoch}\n",
    "HALP": "halp8",
}


def run(method: str, lr: float, seed: int, args) -> list[dict]:
    """One run's per-epoch history (train_loss, test_accuracy, seconds of training)."""
    config = TrainConfig(model=args.model, data=args.data, data_dir=args.data_dir, policy=POLICIES[method],
                         epochs=args.epochs, lr=lr, seed=seed,
                         out=f"{args.runs}/{method}-lr{lr}-seed{seed}")
    train(config, progress=False)
    return _history(config.out)


def _history(out: str) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "train_loss" in m]


def mean(values) -> float:
    return statistics.mean(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="0.03,0.1,0.3")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs", default="runs/halp_deep")
    ap.add_argument("--plot", default="docs/results/halp_lenet5.png")
    args = ap.parse_args()
    seeds, lrs = [int(s) for s in args.seeds.split(",")], [float(x) for x in args.lrs.split(",")]
    print(f"{args.model} on {args.data}: {args.epochs} epochs, batch 32, cosine lr, seeds {seeds}, lr grid {lrs}")
    best: dict[str, list[list[dict]]] = {}
    for method in POLICIES:
        by_lr = {lr: [run(method, lr, seed, args) for seed in seeds] for lr in lrs}
        losses = {lr: mean(h[-1]["train_loss"] for h in runs) for lr, runs in by_lr.items()}
        print(f"{method:7s} final train loss by lr: " + "  ".join(f"{lr:g}: {v:.4f}" for lr, v in losses.items()))
        lr = min(losses, key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)
        best[method] = by_lr[lr]
        runs = by_lr[lr]
        acc = [100 * h[-1]["test_accuracy"] for h in runs]
        print(f"{method:7s} lr {lr:g}: train loss {losses[lr]:.4f}, test accuracy "
              + " ".join(f"{a:.2f}" for a in acc) + f" (mean {mean(acc):.2f} %), "
              f"{mean(e['seconds'] for h in runs for e in h):.2f} s an epoch")
    plot(best, args)


def plot(best: dict[str, list[list[dict]]], args) -> None:
    """Training loss (log) and test accuracy against epochs, mean over seeds with min-max bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, runs in best.items():
        epochs = [h["epoch"] for h in runs[0]]
        for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_accuracy")):
            curves = list(zip(*[[h[key] for h in r] for r in runs]))
            ax.plot(epochs, [mean(c) for c in curves], marker="o", ms=3, label=method)
            ax.fill_between(epochs, [min(c) for c in curves], [max(c) for c in curves], alpha=0.2)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy")
    ax_acc.legend()
    fig.suptitle(f"{args.model} on {args.data}: SGD, LP-SGD (8-bit weights), SVRG, HALP (8-bit offsets), best lr each")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
