"""``sweep``: train every (model, precision, mode, seed), append each result as it finishes.

Rows go to ``out/results.csv`` one by one, so Ctrl-C keeps what finished, and ``resume`` skips
the runs already there (a failed run, one that raised something other than "unsupported", is
run again). A run torch cannot compute in its precision (an op without a kernel for the dtype,
a policy a solver cannot follow) becomes a row ``unsupported: <reason>``, one whose arithmetic
breaks down (a Cholesky factor of a matrix that rounding made indefinite) ``numerical failure:
<reason>``, and the sweep goes on.
At the end, or on Ctrl-C, the summary (``sweep.results``) is written from all the rows.
"""
from __future__ import annotations

import datetime
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import MpcompileError
from .data import load_data
from .models import sweep_model
from .native import run_modes
from .precision import resolve_precision
from .results import append_row, read_rows, write_summary
from .training import WARMUP_STEPS, run_one

__all__ = ["DEFAULT_MODELS", "DEFAULT_PRECISIONS", "sweep"]

DEFAULT_MODELS = ("linreg", "logreg", "svm", "tree", "mlp", "lenet5", "resnet20")
DEFAULT_PRECISIONS = ("fp64", "fp32", "bf16", "fp16", "fp8_e4m3", "hfp8")
_UNSUPPORTED = (NotImplementedError, MpcompileError)


def sweep(models: Sequence[str] = DEFAULT_MODELS, precisions: Sequence[str] = DEFAULT_PRECISIONS, seeds: int = 3,
          out: str | Path = "runs/sweep", *, resume: bool = False, device: str = "cpu",
          data_dir: str | Path | None = None, epochs: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train every model in every precision (each of its modes) with seeds 0 .. seeds - 1.

    Args:
        models: names ``sweep.models.sweep_model`` reads (``logreg``, ``logreg@wine``, ``pkg.mod:factory``).
        precisions: names ``sweep.precision.resolve_precision`` reads (``fp16``, ``hfp8``, ``e5m2``).
        seeds: seeds per (model, precision, mode).
        out: the folder of results.csv, results.json, results.md and plots/.
        resume: keep the rows in ``out`` and run only what is missing; without it, an ``out``
            that holds results is refused.
        device: ``cpu`` or ``cuda``.
        data_dir: where mnist, fashion_mnist and cifar10 are (``name@data`` selects them).
        epochs: every network's epochs instead of its default.
        progress: show a progress bar.

    Returns:
        Every row of results.csv.

    Raises:
        MpcompileError: an unknown model or precision, a bad seed count, results in ``out`` without ``resume``.
    """
    from tqdm import tqdm

    if not isinstance(seeds, int) or seeds < 1:
        raise MpcompileError(f"seeds must be a positive integer, got {seeds!r}")
    specs = [sweep_model(name, epochs=epochs, data_dir=data_dir) for name in models]
    resolved = [resolve_precision(name) for name in precisions]
    out = Path(out)
    csv_path = out / "results.csv"
    if csv_path.exists() and not resume:
        raise MpcompileError(f"{csv_path} holds results of an earlier sweep: pass --resume to add to them, or "
                             f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    rows = read_rows(csv_path)
    kept = [r for r in rows if not r["status"].startswith("failed")]  # a failed run runs again
    if len(kept) < len(rows):  # rewritten without the failed rows
        csv_path.unlink()
        for row in kept:
            append_row(csv_path, row)
    done = {_key(r) for r in kept}
    jobs = [(m, p, mode, seed) for m in specs for p in resolved for mode in run_modes(p, dev) for seed in range(seeds)
            if (m.name, p.name, mode, seed) not in done]
    datasets = {m.name: load_data(m.data, data_dir) for m in specs}  # a missing folder fails before any run
    references = {m.name: (m.reference(datasets[m.name]) if m.reference else None) for m in specs}
    meta = {"machine": f"{platform.machine()} {platform.processor() or platform.system()}, "
                       f"{torch.get_num_threads()} threads of {os.cpu_count()} CPUs", "torch": torch.__version__,
            "python": platform.python_version(), "device": _device_name(dev), "threads": torch.get_num_threads(),
            "warmup_steps": WARMUP_STEPS, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "models": list(models), "precisions": list(precisions), "seeds": seeds}
    bar = tqdm(jobs, desc="sweep", disable=not progress, dynamic_ncols=True)
    try:
        for model, precision, mode, seed in bar:
            bar.set_postfix_str(f"{model.name} {precision.name} {mode} seed {seed}")
            start = time.perf_counter()
            row = _run(model, datasets[model.name], precision, mode, seed, dev)
            row.update(reference=references[model.name], threads=torch.get_num_threads(), device=str(dev))
            row["overhead_seconds"] = time.perf_counter() - start - row.pop("run_seconds")
            append_row(csv_path, row)
    finally:
        bar.close()
        rows = read_rows(csv_path)
        write_summary(out, rows, meta, references, {name: len(d.y_test) for name, d in datasets.items()})
    return rows


def _run(model, data, precision, mode: str, seed: int, device: torch.device) -> dict[str, Any]:
    """One run as a row; its ``run_seconds`` is the time inside the run itself."""
    row = {"model": model.name, "data": model.data, "precision": precision.name, "mode": mode, "seed": seed,
           "metric": model.metric, "target": model.target, "warmup_steps": WARMUP_STEPS}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome = run_one(model, data, precision, mode, seed, device)
        except torch.linalg.LinAlgError as err:
            return {**row, "status": f"numerical failure: {_one_line(err)}", "run_seconds": time.perf_counter() - start}
        except _UNSUPPORTED as err:
            return {**row, "status": f"unsupported: {_one_line(err)}", "run_seconds": time.perf_counter() - start}
        except RuntimeError as err:  # torch's "not implemented for 'Half'" and its kin
            unsupported = "not implemented" in str(err) or "not supported" in str(err)
            status = f"{'unsupported' if unsupported else 'failed'}: {_one_line(err)}"
            return {**row, "status": status, "run_seconds": time.perf_counter() - start}
    said = sorted({_one_line(w.message) for w in caught})  # kept in the row: the progress bar stays readable
    return {**row, "status": "ok", "score": outcome.score, "train_seconds": outcome.train_seconds,
            "seconds_to_target": outcome.seconds_to_target, "prepare_seconds": outcome.prepare_seconds,
            "epochs": outcome.epochs, "final_loss": outcome.final_loss, "notes": outcome.notes,
            "warnings": " | ".join(said),
            "run_seconds": time.perf_counter() - start}


def _one_line(err: BaseException | Warning) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return row["model"], row["precision"], row["mode"], row["seed"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return f"CPU ({names[0] if names else platform.processor() or platform.machine()})"
