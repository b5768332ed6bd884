"""Which number-level metric predicts what a format costs in accuracy?

Every shipped recipe trains lenet5 on digits (3 seeds), monitored; per recipe this takes the
mean SQNR of each role, the shares that underflow and overflow, and the stagnation of the
stored weights, over every monitored step and op, and the accuracy gap to fp32 (same seeds).
Then, across recipes, the Spearman rank correlation of each metric with the gap. It writes
``docs/results/metrics.md`` (the tables) and ``docs/results/metrics_snr.png`` (the gap against
the best-correlated metric), whatever they show.

    .venv/bin/python examples/snr_vs_accuracy.py [--epochs 5] [--seeds 0 1 2] [--every 10] [--recipes ...]

Recipes whose optimizer takes its own steps (trust_region, halp8, lpsvrg8) are not monitored
and are left out, as the table says.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from scipy.stats import spearmanr

from mpcompile.policy import load_policy, shipped_policies
from mpcompile.runtime.optim import VARIANCE_REDUCED
from mpcompile.runtime.trainer import TrainConfig, Trainer

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
ROLES = ("input", "weight", "output", "grad_output", "grad_input", "grad_weight")


def monitorable(name: str) -> bool:
    policy = load_policy(name)
    return policy.trust_region is None and policy.optimizer.kind not in VARIANCE_REDUCED


def train(model: str, policy: str, seed: int, epochs: int, every: int, out: Path) -> tuple[float, list[dict]]:
    """Final test accuracy and the monitor's rows of one run."""
    run = out / f"{policy}-{seed}"
    config = TrainConfig(model=model, data="digits", policy=policy, epochs=epochs, seed=seed, out=str(run),
                         monitor=every if policy != "fp32" else None)
    summary = Trainer(config, progress=False).fit()
    rows = [json.loads(line) for line in (run / "monitor.jsonl").read_text().splitlines()] if policy != "fp32" else []
    return summary["test_accuracy"], rows


def metrics(rows: list[dict]) -> dict[str, float]:
    """A recipe's candidate metrics over all its monitored rows (NaN where no row has one)."""
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["role"] in ROLES:
            if r["sqnr_db"] is not None and math.isfinite(r["sqnr_db"]):
                by[f"sqnr {r['role']}"].append(r["sqnr_db"])
            by[f"underflow {r['role']}"].append(r["underflow"])
            by[f"overflow {r['role']}"].append(r["overflow"])
        elif r["role"] in ("master", "update") and r["stagnation"] is not None:
            by[f"stagnation {r['role']}"].append(r["stagnation"])
    out = {k: statistics.fmean(v) for k, v in by.items()}
    sqnrs = [out[f"sqnr {role}"] for role in ROLES if f"sqnr {role}" in out]
    out["sqnr min over roles"] = min(sqnrs) if sqnrs else math.nan
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--every", type=int, default=10, help="monitor every this many steps")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--recipes", nargs="+", help="shipped recipes to compare (default: all)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    recipes = [p for p in (args.recipes or shipped_policies()) if p != "fp32"]
    left_out = [p for p in recipes if not monitorable(p)]
    recipes = [p for p in recipes if p not in left_out]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = {seed: train(args.model, "fp32", seed, args.epochs, args.every, Path(tmp))[0] for seed in args.seeds}
        for policy in recipes:
            accuracies, rows = [], []
            for seed in args.seeds:
                accuracy, seed_rows = train(args.model, policy, seed, args.epochs, args.every, Path(tmp))
                accuracies.append(base[seed] - accuracy)
                rows += seed_rows
            results[policy] = {"gap": statistics.fmean(accuracies), "metrics": metrics(rows)}
            print(f"{policy:10s} gap {100 * results[policy]['gap']:+.2f} points", flush=True)
    write(results, base, left_out, args)


def write(results: dict, base: dict, left_out: list[str], args) -> None:
    names = sorted({k for r in results.values() for k in r["metrics"]})
    gaps = [results[p]["gap"] for p in results]
    correlations = {}
    for name in names:
        pairs = [(results[p]["metrics"].get(name, math.nan), g) for p, g in zip(results, gaps)]
        pairs = [(m, g) for m, g in pairs if math.isfinite(m)]
        if len(pairs) >= 4 and len({m for m, _ in pairs}) > 1:
            result = spearmanr([m for m, _ in pairs], [g for _, g in pairs])
            correlations[name] = (result.statistic, result.pvalue, len(pairs))
    ranked = sorted(correlations, key=lambda k: -abs(correlations[k][0]))
    lines = ["# Which metric predicts a format's accuracy cost (examples/snr_vs_accuracy.py)", "",
             f"{args.model} on digits, {args.epochs} epoch{'' if args.epochs == 1 else 's'}, seeds {args.seeds}, "
             f"monitored every {args.every} steps; the gap "
             f"is fp32's test accuracy minus the recipe's, mean over seeds (fp32: "
             f"{100 * statistics.fmean(base.values()):.2f} %). Left out (their optimizer takes its own steps, "
             f"which the monitor does not record): {', '.join(left_out) or 'none'}.", "",
             "| recipe | gap (points) | " + " | ".join(ranked[:6]) + " |",
             "|---|---|" + "---|" * len(ranked[:6])]
    for p in sorted(results, key=lambda p: results[p]["gap"]):
        cells = [f"{results[p]['metrics'].get(k, math.nan):.3g}" for k in ranked[:6]]
        lines.append(f"| {p} | {100 * results[p]['gap']:+.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Spearman rank correlation of each metric with the gap, across recipes (a metric a recipe "
              "lacks, such as stagnation without a master format, leaves that recipe out of its row):", "",
              "| metric | rho | p (no correlation) | recipes |", "|---|---|---|---|"]
    lines += [f"| {k} | {correlations[k][0]:+.2f} | {correlations[k][1]:.2g} | {correlations[k][2]} |" for k in ranked]
    args.out.mkdir(parents=True, exist_ok=True)
    if ranked:
        plot(results, ranked[0], args.out / "metrics_snr.png", args.model)
        lines += ["", f"![gap against {ranked[0]}](metrics_snr.png)"]
    (args.out / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: dict, metric: str, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p, r in results.items():
        value = r["metrics"].get(metric, math.nan)
        if math.isfinite(value):
            ax.scatter(value, 100 * r["gap"])
            ax.annotate(p, (value, 100 * r["gap"]), fontsize=8)
    ax.set_xlabel(metric)
    ax.set_ylabel("accuracy gap to fp32 (points)")
    ax.set_title(f"{model} / digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
