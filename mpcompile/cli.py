"""The ``mpcompile`` command line."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator

from .errors import MpcompileError
from .formats import BlockFormat, CodebookFormat, FixedFormat, FloatFormat, Format, get, names, parse
from .models import build_model
from .policy import OPTIMIZER_KINDS, MonitorSettings, Policy, load_policy
from .policy.schema import OPTIMIZER_KEY_KINDS
from .policy.lock import runtime_sections
from .views import settings_text

__all__ = ["main", "formats_table", "policy_summary", "inspect_model", "memory_model"]


def _specials(fmt: Format) -> str:
    if isinstance(fmt, CodebookFormat):
        return f"{fmt.block_size} x {fmt.bits}-bit codebook index + fp32 absmax (range relative to it)"
    if isinstance(fmt, BlockFormat):
        return f"{fmt.block_size} x {fmt.element} + e8m0 scale"
    if isinstance(fmt, FixedFormat):
        return "none" + ("" if fmt.signed else ", unsigned")
    parts = ["inf" if fmt.inf else "", {"ieee": "NaN", "fn": "NaN (all ones)", "negzero": "NaN (-0 code)"}.get(fmt.nan, ""),
             "-0" if fmt.neg_zero else "", "" if fmt.signed else "unsigned", "" if fmt.has_zero else "no zero",
             "" if fmt.subnormals else "no subnormals"]
    return ", ".join(p for p in parts if p) or "none"


def formats_table(fmts: list[Format]) -> str:
    """A text table of the formats' bits, range, precision and special values."""
    head = ("format", "bits", "max", "min normal", "min subnormal", "eps", "special values")
    rows = [(str(f), str(f.bits), f"{f.max:.6g}", f"{f.min_normal:.6g}", f"{f.min_subnormal:.6g}",
             f"{f.eps:.6g}", _specials(f)) for f in fmts]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def policy_summary(policy: Policy) -> str:
    """What a policy sets, section by section, as ``mpcompile check`` prints it."""
    lines = [f"{policy.source}: ok: policy '{policy.name}'" + (f" ({policy.description})" if policy.description else ""),
             f"  default: {settings_text(policy.default)}"]
    lines += [f"  {rule.label}: {settings_text(rule.settings)}" for rule in policy.rules]
    lines += [f"  [{i}] {lv.label}: {settings_text(lv.settings) if i else 'the policy itself'}"
              for i, lv in enumerate(policy.levels)]
    optimizer = runtime_sections(policy.optimizer, None, False).get("optimizer", {})
    kind = policy.optimizer.kind
    read = {k: str(getattr(policy.optimizer, k)) for k, kinds in OPTIMIZER_KEY_KINDS.items()  # defaults shown too
            if kind in kinds and getattr(policy.optimizer, k) is not None}
    if optimizer:
        lines.append("  optimizer: " + ", ".join(f"{k}={v}" for k, v in (optimizer | read).items()))
    if any(isinstance(getattr(policy.optimizer, k), CodebookFormat) for k in ("momentum", "second_moment")):
        from .runtime.optim.codebook_states import MIN_NUMEL

        lines.append(f"    codebook states: parameters of fewer than {MIN_NUMEL} elements keep fp32 states (as "
                     f"bitsandbytes' 8-bit optimizers)")
    return "\n".join(lines)


def inspect_model(model_spec: str, policy: str, shape: str, fmt: str, calibrate: bool = False) -> str:
    """What ``mpcompile inspect`` prints: the compiled model's table, JSON lock, DOT or SVG.
    With ``calibrate`` the condition and stats passes run on a random batch of that shape."""
    import torch

    from .compiler import compile as compile_model
    from .views import rich_table, to_svg

    said = _Warnings()
    with said.caught():
        cm = compile_model(build_model(model_spec).eval(), _policy_source(policy),
                           (torch.randn(_shape(shape)),), calibration=None if calibrate else [])
    said.flush(cm.warnings if fmt == "table" else ())
    if fmt == "table" and sys.stdout.isatty():  # colours by operand bits
        from rich.console import Console
        console = Console(file=io.StringIO(), force_terminal=True, width=Console().width)
        console.print(rich_table(cm))
        return console.file.getvalue().rstrip("\n")
    views = {"table": cm.table, "json": cm.to_json, "dot": cm.to_dot, "svg": lambda: to_svg(cm)}
    return views[fmt]()


def memory_model(model_spec: str, policy: str, shape: str, batch: int, optimizer: str | None = None,
                 device: str = "cpu", fmt: str = "table") -> str:
    """What ``mpcompile memory`` prints: the bytes one training step of the model compiled under
    ``policy`` holds, by category (``runtime.memory.memory_report``), as a table or JSON.

    Args:
        model_spec: a model ``models.build_model`` knows.
        policy: a policy file, a shipped policy's name or YAML text.
        shape: the example input's shape (comma-separated); the step runs on ``batch`` of it.
        batch: the batch of the measured step.
        optimizer: the optimizer kind (None: the policy's, else sgd).
        device: where the step runs (``cpu``, ``cuda[:N]``).
        fmt: ``table`` or ``json``.
    """
    import torch

    from .compiler import compile as compile_model
    from .runtime.memory import memory_report

    said = _Warnings()
    with said.caught():
        model = build_model(model_spec).to(device)
        cm = compile_model(model, _policy_source(policy), (torch.randn(_shape(shape), device=device),), calibration=[])
        report = memory_report(cm, batch, optimizer=optimizer)
    said.flush()
    return report.table() if fmt == "table" else report.to_json()


def _shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: comma-separated sizes."""
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise MpcompileError(f"--input-shape {text!r}: give comma-separated sizes, e.g. 1,3,224,224") from None


class _Warnings:
    """Python warnings raised under ``caught()``, each printed once to stderr by ``flush``, except
    those the command's own output shows (a table lists its model's warnings)."""

    def __init__(self):
        self.printed: set[str] = set()

    @contextlib.contextmanager
    def caught(self) -> Iterator[None]:
        with warnings.catch_warnings(record=True) as self._caught:
            warnings.simplefilter("always")
            yield

    def flush(self, shown: "list[str]" = ()) -> None:
        skip = self.printed | {f"mpcompile: {text}" for text in shown}
        for text in dict.fromkeys(str(w.message) for w in self._caught):
            if text not in skip:
                print(f"warning: {text}", file=sys.stderr)
        self.printed |= {str(w.message) for w in self._caught}
        self._caught.clear()


def _policy_source(text: str) -> "Path | str":
    """A policy argument: an existing file, else a shipped policy's name or YAML text."""
    return Path(text) if Path(text).is_file() or text.endswith((".yaml", ".yml")) else text


def _train(args, argv: list[str]) -> str | None:
    """Run ``mpcompile train`` and return its final summary table; warnings go to stderr once
    each, the compiled model's before the run starts. With ``--nproc N`` (and not already a rank
    of a distributed run) launch N ranks instead; rank 0 alone returns its table."""
    if args.resume:
        _refuse_ignored_on_resume(argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .runtime.distributed.launch import launch

        launch(_without_nproc(argv), args.nproc)
        return None
    said = _Warnings()
    with said.caught():
        trainer = _trainer(args)
        said.flush()
        summary = trainer.fit()
        if trainer.parallel is not None:
            trainer.parallel.close()
    said.flush()
    if trainer.parallel is not None and not trainer.parallel.leader:
        return None
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{k.ljust(width)}  {v}" for k, v in rows] + [f"{'run folder'.ljust(width)}  {trainer.out}"])


_RESUME_OPTIONS = ("--resume", "--epochs", "--out", "--nproc")  # the rest of a run's settings are its checkpoint's


def _refuse_ignored_on_resume(argv: list[str]) -> None:
    """A resumed run takes its settings from its checkpoint: options it would not apply are refused.

    Raises:
        MpcompileError: naming the options given besides ``_RESUME_OPTIONS``.
    """
    given = sorted({arg.split("=", 1)[0] for arg in argv if arg.startswith("--")} - set(_RESUME_OPTIONS))
    if given:
        raise MpcompileError(f"train --resume goes on with the settings saved in the run's checkpoint, so "
                             f"{', '.join(given)} would not be applied; with --resume only "
                             f"{', '.join(_RESUME_OPTIONS[1:])} apply: drop the others, or start a new run")


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` (``--nproc=N``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _trainer(args):
    from .runtime.trainer import TrainConfig, Trainer

    if args.resume:
        return Trainer.resume(args.resume, epochs=args.epochs, out=args.out)
    loss_scale = args.loss_scale
    if loss_scale not in (None, "none", "dynamic"):
        try:
            loss_scale = float(loss_scale)
        except ValueError:
            raise MpcompileError(f"--loss-scale {loss_scale!r}: give none, dynamic or a number") from None
    out = args.out or f"runs/{args.model}-{args.data}-{Path(args.policy).stem}"
    return Trainer(TrainConfig(args.model, args.data, args.policy,
                               TrainConfig.epochs if args.epochs is None else args.epochs,
                               args.batch_size, args.lr,
                               args.optimizer, args.seed, out, args.data_dir, loss_scale,
                               device=args.device, schedule=args.schedule,
                               calibration_batches=args.calibration_batches, stats=args.stats,
                               monitor=args.monitor, fsdp=args.fsdp))


def _report(args) -> str:
    """Write ``mpcompile report``'s page and return its path."""
    from .report import write_report

    return str(write_report(args.run))


def _sweep(args) -> str:
    """Run ``mpcompile sweep`` and return where its results are."""
    from .sweep.runner import sweep

    split = lambda text: [part for part in re.split(r",(?![^(]*\))", text) if part]  # noqa: E731 - fixed(8,4) is one
    rows = sweep(split(args.models), split(args.precisions), args.seeds, args.out, resume=args.resume,
                 device=args.device, data_dir=args.data_dir, epochs=args.epochs, progress=True)
    ok = sum(r["status"] == "ok" for r in rows)
    return f"{ok} of {len(rows)} runs ok; results: {Path(args.out) / 'results.md'} (and results.csv, results.json, plots/)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mpcompile", description="Mixed-precision compiler for PyTorch.")
    sub = ap.add_subparsers(dest="command", required=True)
    fp = sub.add_parser("formats", help="list the number formats (or describe the given specs)")
    fp.add_argument("specs", nargs="*", help="format names or specs, e.g. e5m10 'p3109(8,3)' 'mx(fp6_e3m2,16)'")
    cp = sub.add_parser("check", help="read and validate precision policies (YAML files)")
    cp.add_argument("policies", nargs="+", help="policy files or shipped names, e.g. policies/hfp8.yaml, bf16")
    ip = sub.add_parser("inspect", help="compile a model under a policy and show what each op gets")
    ip.add_argument("model", help="lenet5, mlp, logreg, resnet20, a torchvision model (resnet18) or package.module:factory")
    ip.add_argument("--policy", default="version: 1\n", help="a policy file or shipped name (default: fp32, nothing changed)")
    ip.add_argument("--input-shape", default="1,3,224,224", help="example input shape (default 1,3,224,224)")
    ip.add_argument("--format", choices=("table", "json", "dot", "svg"), default="table")
    ip.add_argument("--calibrate", action="store_true", help="estimate kappa, overflow and SQNR on a random batch")
    from .runtime.distributed.data_parallel import PARAM_DTYPES
    from .runtime.trainer import TrainConfig  # its defaults are the command's

    tp = sub.add_parser("train", help="train a model under a policy (progress, metrics, plots, checkpoints)")
    tp.add_argument("--model", default="lenet5", help="lenet5, mlp, logreg, resnet20, a torchvision model or "
                                                      "package.module:factory (default lenet5)")
    tp.add_argument("--data", default="digits", help="digits (built in), mnist, fashion_mnist, cifar10 (from --data-dir) or fake")
    tp.add_argument("--data-dir", help="folder holding MNIST/ or cifar-10-batches-py/")
    tp.add_argument("--policy", default="fp32", help="a policy file or shipped name (default fp32)")
    tp.add_argument("--epochs", type=int,
                    help=f"epochs to train to (default {TrainConfig.epochs}; with --resume: the run's)")
    tp.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                    help=f"default {TrainConfig.batch_size}")
    tp.add_argument("--lr", type=float, default=TrainConfig.lr, help=f"peak learning rate (default {TrainConfig.lr})")
    tp.add_argument("--optimizer", default=TrainConfig.optimizer, choices=OPTIMIZER_KINDS,
                    help="sgd (momentum 0.9), adam, adamw, svrg, lpsvrg, halp or swalp (default: the policy's "
                         "optimizer kind, else sgd); the variance-reduced ones read T, mu, bits from the policy")
    tp.add_argument("--loss-scale", help="none, dynamic or a number (default: dynamic when gradients are rounded)")
    tp.add_argument("--schedule", default=TrainConfig.schedule,
                    help=f"lr schedule: constant or cosine (default {TrainConfig.schedule})")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    tp.add_argument("--out", help="run folder (default runs/MODEL-DATA-POLICY)")
    tp.add_argument("--calibration-batches", type=int, default=TrainConfig.calibration_batches,
                    help="training batches the condition and stats passes measure, at the start and after each "
                         "recompile that changes formats, where the policy reads kappa or --stats is given "
                         f"(default {TrainConfig.calibration_batches})")
    tp.add_argument("--stats", action="store_true",
                    help="measure overflow, underflow and SQNR per op on the calibration batches (table.txt)")
    tp.add_argument("--monitor", type=int, nargs="?", const=MonitorSettings.every, metavar="EVERY",
                    help="record number statistics every EVERY steps (default "
                         f"{MonitorSettings.every}; the policy's monitor section says which ops and roles): "
                         "monitor.jsonl and TensorBoard files in tb/, read by `mpcompile report`")
    tp.add_argument("--resume", help="a run folder or checkpoint.pt to continue (to --epochs, if given)")
    tp.add_argument("--nproc", type=int, default=1,
                    help="data-parallel processes on this machine (torch.distributed, gloo on CPU, nccl on CUDA; "
                         "default 1); --batch-size is the global batch, dealt among them; the policy's "
                         "communication section sets the format gradients travel in")
    tp.add_argument("--fsdp", nargs="?", const="bf16", choices=tuple(PARAM_DTYPES), metavar="DTYPE",
                    help="with --nproc N: shard the model with FSDP2 instead of DDP, its parameters gathered for "
                         "each forward in DTYPE (fp32, bf16 or fp16; default bf16) and gradients reduce-scattered "
                         "in fp32")
    rp = sub.add_parser("report", help="write a run's report.html: per layer exponent heat maps, shares, SQNR, memory")
    rp.add_argument("run", help="a run folder written by `mpcompile train ... --monitor`")
    mp = sub.add_parser("memory", help="bytes one training step holds: parameters, master weights, gradients, "
                                       "optimizer states, activations (nominal, held, fp32)")
    mp.add_argument("model", help="lenet5, mlp, logreg, resnet20, a torchvision model (resnet18) or package.module:factory")
    mp.add_argument("--policy", default="fp32", help="a policy file or shipped name (default fp32)")
    mp.add_argument("--batch", type=int, default=TrainConfig.batch_size,
                    help=f"batch of the measured step (default {TrainConfig.batch_size})")
    mp.add_argument("--input-shape", default="1,3,224,224",
                    help="example input shape (default 1,3,224,224); the step runs on --batch of it")
    mp.add_argument("--optimizer", choices=OPTIMIZER_KINDS,
                    help="the optimizer whose states are measured (default: the policy's optimizer kind, else sgd)")
    mp.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    mp.add_argument("--format", choices=("table", "json"), default="table")
    from .sweep.runner import DEFAULT_MODELS, DEFAULT_PRECISIONS

    sp = sub.add_parser("sweep", help="train models in many precisions, natively and emulated: time and accuracy")
    sp.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated: linreg, linreg_qr, linreg_normal, logreg, svm, tree, mlp, lenet5, resnet20, "
                         "NAME@DATA (logreg@wine, mlp@fashion_mnist) or package.module:factory "
                         f"(default {','.join(DEFAULT_MODELS)})")
    sp.add_argument("--precisions", default=",".join(DEFAULT_PRECISIONS),
                    help="comma-separated: fp64, fp32, bf16, fp16 (native and emulated), shipped policies (fp8_e4m3, "
                         f"hfp8, mxfp8) or formats (e5m2, 'fixed(8,4)') (default {','.join(DEFAULT_PRECISIONS)})")
    sp.add_argument("--seeds", type=int, default=3, help="seeds per run (default 3)")
    sp.add_argument("--epochs", type=int, help="every network's epochs (default: each model's own)")
    sp.add_argument("--out", default="runs/sweep", help="results folder (default runs/sweep)")
    sp.add_argument("--resume", action="store_true", help="keep the rows in --out and run what is missing")
    sp.add_argument("--data-dir", help="folder holding MNIST/, FashionMNIST/ or cifar-10-batches-py/")
    sp.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = ap.parse_args(argv)
    try:
        if args.command == "formats":
            print(formats_table([parse(s) for s in args.specs] if args.specs else [get(n) for n in names()]))
        elif args.command == "inspect":
            print(inspect_model(args.model, args.policy, args.input_shape, args.format, args.calibrate))
        elif args.command == "train":
            text = _train(args, sys.argv[1:] if argv is None else list(argv))
            if text is not None:
                print(text)
        elif args.command == "report":
            print(_report(args))
        elif args.command == "memory":
            print(memory_model(args.model, args.policy, args.input_shape, args.batch, args.optimizer, args.device,
                               args.format))
        elif args.command == "sweep":
            print(_sweep(args))
        elif args.command == "check":
            for path in args.policies:
                print(policy_summary(load_policy(_policy_source(path))))
    except MpcompileError as err:
        print(f"mpcompile: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command != "sweep":
            raise
        print(f"mpcompile: interrupted; the finished runs are in {args.out}/results.csv: add --resume to go on",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
