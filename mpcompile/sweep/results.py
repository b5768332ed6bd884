"""A sweep's results: rows appended to results.csv as runs finish, and the summary written from them.

``results.csv`` holds one row per run (``FIELDS``); ``results.json`` the machine, the settings,
the rows, scikit-learn's reference scores and the findings; ``results.md`` a table per model
(mean and standard deviation over seeds) and the findings; ``plots/`` the score against the
training time per model (log time) and one bar chart per model. A finding is a precision whose
emulated and native mean scores differ by more than seed noise allows: more than two standard
errors of the difference and more than one test example's worth of score.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

__all__ = ["FIELDS", "append_row", "read_rows", "findings", "write_summary"]

FIELDS = ("model", "data", "precision", "mode", "seed", "status", "metric", "score", "reference", "train_seconds",
          "seconds_to_target", "target", "prepare_seconds", "epochs", "final_loss", "warmup_steps", "device",
          "threads", "overhead_seconds", "notes", "warnings")
_NUMBERS = ("score", "reference", "train_seconds", "seconds_to_target", "target", "prepare_seconds", "final_loss",
            "overhead_seconds")
_INTEGERS = ("seed", "epochs", "warmup_steps", "threads")


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add ``row`` to the CSV at ``path`` (with a header if the file is new), flushed to disk."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in FIELDS})


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results.csv, numbers as numbers and empty cells as None."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in _NUMBERS + _INTEGERS:
            value = row.get(key)
            row[key] = None if value in ("", None) else (int(value) if key in _INTEGERS else float(value))
    return rows


def _ok(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def _groups(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(model, precision, mode) -> its rows, in the order they first appear."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["model"], r["precision"], r["mode"]), []).append(r)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def findings(rows: list[dict], test_sizes: dict[str, int]) -> list[dict[str, Any]]:
    """Per model and precision run both ways: native and emulated mean scores, their gap, and
    whether it exceeds seed noise (see the module docstring).

    Args:
        rows: the results.
        test_sizes: the test split's size per model (one example's worth of accuracy).
    """
    groups = _groups(_ok(rows))
    out = []
    for (model, precision, mode), native in groups.items():
        emulated = groups.get((model, precision, "emulated"))
        if mode != "native" or not emulated:
            continue
        (mn, sn), (me, se) = _mean_std([r["score"] for r in native]), _mean_std([r["score"] for r in emulated])
        noise = 2 * math.sqrt(sn**2 / len(native) + se**2 / len(emulated))
        step = 1 / test_sizes[model] if native[0]["metric"] == "accuracy" else 0.0
        gap = me - mn
        out.append({"model": model, "precision": precision, "native": mn, "emulated": me, "gap": gap,
                    "noise": noise, "flagged": abs(gap) > max(noise, step)})
    return out


def _table(rows: list[dict]) -> list[str]:
    lines = []
    by_model: dict[str, list] = {}
    for key, group in _groups(rows).items():
        by_model.setdefault(key[0], []).append((key, group))
    for model, groups in by_model.items():
        first = groups[0][1][0]
        baseline = [r["train_seconds"] for r in _ok(rows) if r["model"] == model and r["precision"] == "fp32"
                    and r["mode"] == "native"]
        ref = first["reference"]
        lines += [f"### {model} on {first['data']} ({first['metric']}, target {first['target']:g}"
                  + (f"; scikit-learn fp64: {ref:.4f})" if ref is not None else ")"), "",
                  "| precision | mode | runs | score (mean ± std) | train s | x fp32 native | s to target | notes |",
                  "|---|---|---|---|---|---|---|---|"]
        for (_, precision, mode), group in groups:
            ok = _ok(group)
            if not ok:
                lines.append(f"| {precision} | {mode} | {len(group)} | {group[0]['status']} | | | | |")
                continue
            score, spread = _mean_std([r["score"] for r in ok])
            seconds = statistics.fmean(r["train_seconds"] for r in ok)
            ratio = f"{seconds / statistics.fmean(baseline):.2f}" if baseline else ""
            reached = [r["seconds_to_target"] for r in ok if r["seconds_to_target"] is not None]
            to_target = f"{statistics.fmean(reached):.3g} ({len(reached)}/{len(ok)})" if reached else f"never (0/{len(ok)})"
            notes = "; ".join(sorted({r["notes"] for r in ok if r["notes"]}))
            lines.append(f"| {precision} | {mode} | {len(ok)} | {score:.4f} ± {spread:.4f} | {seconds:.3g} | {ratio} | "
                         f"{to_target} | {notes} |")
        lines.append("")
    return lines


def write_summary(out: Path, rows: list[dict], meta: dict[str, Any], references: dict[str, float | None],
                  test_sizes: dict[str, int]) -> None:
    """Write results.json, results.md and the plots from ``rows``."""
    found = findings(rows, test_sizes)
    (out / "results.json").write_text(json.dumps({**meta, "references": references, "findings": found,
                                                  "rows": rows}, indent=1, default=str))
    flagged = [f for f in found if f["flagged"]]
    overheads = [r["overhead_seconds"] for r in rows if r["overhead_seconds"] is not None]
    overhead = (f" The sweep's own work per run (outside the run: its row, the files, the progress bar) took "
                f"{statistics.median(overheads) * 1e3:.3f} ms (median), {max(overheads) * 1e3:.3f} ms at most."
                if overheads else "")
    lines = [f"# Precision sweep ({meta['device']}, {meta['threads']} CPU threads, torch {meta['torch']})", "",
             f"{meta['machine']}; {len(_ok(rows))} runs ok of {len(rows)}. Training time is wall time of the epochs' "
             f"steps after {meta['warmup_steps']} warm-up steps on a copy, without evaluations; `x fp32 native` is "
             f"the time over fp32's on the same model. `native` runs in the torch dtype (the hardware's speed), "
             f"`emulated` under an mpcompile policy (the format's accuracy, emulation's time).{overhead}", "",
             *_table(rows), "## Emulated against native", "",
             "| model | precision | native | emulated | gap | seed noise (2 s.e.) | finding |", "|---|---|---|---|---|---|---|",
             *[f"| {f['model']} | {f['precision']} | {f['native']:.4f} | {f['emulated']:.4f} | {f['gap']:+.4f} | "
               f"{f['noise']:.4f} | {'**gap beyond noise**' if f['flagged'] else 'agree'} |" for f in found], "",
             f"{len(flagged)} of {len(found)} precisions run both ways differ by more than seed noise.", ""]
    (out / "results.md").write_text("\n".join(lines))
    _plots(out / "plots", rows)


def _plots(folder: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    folder.mkdir(parents=True, exist_ok=True)
    ok = _ok(rows)
    models = list(dict.fromkeys(r["model"] for r in ok))
    if not models:
        return
    groups = _groups(ok)
    first = {r["model"]: r for r in reversed(ok)}
    precisions = list(dict.fromkeys(r["precision"] for r in ok))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(precisions)}
    cols = min(3, len(models))
    fig, axes = plt.subplots(-(-len(models) // cols), cols, figsize=(5 * cols, 3.6 * -(-len(models) // cols)),
                             squeeze=False)
    for ax, model in zip(axes.flat, models):
        for (m, precision, mode), group in groups.items():
            if m != model:
                continue
            ax.scatter([max(r["train_seconds"], 1e-6) for r in group], [r["score"] for r in group],
                       color=colors[precision], marker="o" if mode == "native" else "^",
                       facecolors=colors[precision] if mode == "native" else "none",
                       label=f"{precision} {mode}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^0, 3x10^0, ... overlap
        ax.set_title(f"{model} ({first[model]['data']})")
        ax.set_xlabel("training time (s, log)")
        ax.set_ylabel(first[model]["metric"])
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[p], marker=m, linestyle="", markerfacecolor=colors[p] if f else "none",
                      label=f"{p} {mode}") for p in precisions for mode, m, f in (("native", "o", True),
                                                                                     ("emulated", "^", False))
               if any(k[1:] == (p, mode) for k in groups)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 * -(-len(handles) // 6), 1, 1))
    fig.savefig(folder / "score_vs_time.png", dpi=110)
    plt.close(fig)
    for model in models:
        keys = [k for k in groups if k[0] == model]
        labels = [f"{p}\n{mode}" for _, p, mode in keys]
        fig, (left, right) = plt.subplots(1, 2, figsize=(max(6, 1.1 * len(keys) * 2), 3.6))
        for ax, field, title in ((left, "score", first[model]["metric"]), (right, "train_seconds", "training time (s)")):
            stats = [_mean_std([r[field] for r in groups[k]]) for k in keys]
            ax.bar(range(len(keys)), [s[0] for s in stats], yerr=[s[1] for s in stats],
                   color=[colors[k[1]] for k in keys], edgecolor="black")
            for i, k in enumerate(keys):
                if k[2] == "emulated":
                    ax.patches[i].set_hatch("//")
            ax.set_xticks(range(len(keys)), labels, fontsize=7)
            ax.set_title(f"{model}: {title}")
        right.set_yscale("log")
        fig.tight_layout()
        fig.savefig(folder / f"bars_{model.replace(':', '_').replace('@', '_at_')}.png", dpi=110)
        plt.close(fig)
