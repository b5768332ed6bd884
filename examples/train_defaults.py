"""``mpcompile train --model lenet5 --data digits`` at its defaults, under fp32, hfp8 and the
shipped trust_region policy, seeds 0-2: test accuracy per run and the means, against the bars
(fp32 mean >= 97 %, hfp8 within 1.5 points of it, trust_region within 1 point).

    .venv/bin/python examples/train_defaults.py [--seeds 0,1,2] [--runs runs/defaults]

About a minute on 2 cores (fp32 2 s a run, hfp8 14 s, trust_region 4 s, after imports).
"""
from __future__ import annotations

import argparse
import statistics
import time

from mpcompile.runtime.trainer import TrainConfig, train

BARS = {"hfp8": 1.5, "trust_region": 1.0}  # points below the fp32 mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="runs/defaults")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    d = TrainConfig()
    print(f"lenet5 / digits at the defaults: {d.epochs} epochs, {d.optimizer}, lr {d.lr} ({d.schedule}), "
          f"batch {d.batch_size}")
    means = {}
    for policy in ("fp32", "hfp8", "trust_region"):
        accs, seconds = [], []
        for seed in seeds:
            start = time.perf_counter()
            summary = train(policy=policy, seed=seed, out=f"{args.runs}/{policy}-seed{seed}", progress=False)
            seconds.append(time.perf_counter() - start)
            accs.append(100 * summary["test_accuracy"])
        means[policy] = statistics.mean(accs)
        print(f"{policy:13s} " + "  ".join(f"{a:6.2f}" for a in accs)
              + f"   mean {means[policy]:6.2f} %   {statistics.median(seconds):5.1f} s a run")
    print(f"fp32 mean {means['fp32']:.2f} % (bar >= 97): {'met' if means['fp32'] >= 97 else 'MISSED'}")
    for policy, bar in BARS.items():
        gap = means["fp32"] - means[policy]
        print(f"{policy} {gap:.2f} points below fp32 (bar <= {bar}): {'met' if gap <= bar else 'MISSED'}")


if __name__ == "__main__":
    main()
