"""Every shipped policy trains LeNet-5 on sklearn's 8x8 digits: which recipes hold up, which do not.

Each shipped fixed-precision policy (``mpcompile.policy.shipped_policies()`` but those with a
``trust_region`` section, see trust_region_digits.py) trains ``lenet5`` on ``digits``
with the same hyper-parameters and seeds; run ``POLICY`` with seed ``S`` is written to
``runs/recipes/POLICY-seedS`` (metrics, curves, checkpoint, summary, plus ``recipe.json``, the
record this script reads back). The results go to ``docs/results/recipes_digits.md``: one row
per policy (test accuracy mean and std over seeds, final train loss, time per epoch as a ratio
to fp32's, overflowed steps, notes) and a "What happens" section written from the numbers,
including the bars: fp32 >= 97 %, bf16 and hfp8 within 1.5 points of fp32.

    .venv/bin/python examples/recipes_digits.py                      # everything (about 9 min on 2 cores)
    .venv/bin/python examples/recipes_digits.py --epochs 3 --seeds 0 --policies fp32,hfp8 --doc /tmp/r.md
    .venv/bin/python examples/recipes_digits.py --from-runs          # rewrite the markdown from saved runs

The setup is fixed for every policy (SGD with momentum 0.9, lr 0.05, batch 64, 30 epochs; the
loss scaling is the trainer's default: dynamic when a policy rounds a gradient, none otherwise;
one torch thread, see THREADS).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpcompile.formats import BlockFormat
from mpcompile.ops.roles import delayed_scale, quantize_role
from mpcompile.policy import load_policy, shipped_policies
from mpcompile.runtime.data import batches, load_dataset
from mpcompile.runtime.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
MODEL, DATA = "lenet5", "digits"
OPTIMIZER, LR, BATCH_SIZE, EPOCHS, SEEDS = "sgd", 0.05, 64, 30, (0, 1, 2)
REFERENCE = "fp32"
FP32_BAR = 97.0  # fp32 must reach this test accuracy (%)
CLOSE_BAR, CLOSE_POLICIES = 1.5, ("bf16", "hfp8")  # these must stay within CLOSE_BAR points of fp32
DIVERGED_BELOW = 20.0  # a run whose test accuracy (%) ends below this (chance: 10 %) counts as diverged ...
CHANCE_LOSS = math.log(10)  # ... and so does one whose final train loss is above a uniform guess's
INIT_LOSS_SCALE = 2.0**16  # the trainer's dynamic loss scaler starts here
COMMAND = ".venv/bin/python examples/recipes_digits.py"
# One thread: these models are too small to gain from more (measured: within ~15 %), and a single
# thread keeps the times steady when other work shares the machine (two threads on two busy cores
# slowed epochs down by 10x and more).
THREADS = 1

# What makes a recipe a suspect before any run; the text says whether it held up (from the runs).
SUSPECT = {
    "fp8_e4m3": "E4M3 everywhere, gradients included, with per-tensor amax scaling",
    "mxfp8": "MX blocks of 32 that also run across the backward sums",
    "mxfp6": "6-bit MX elements",
    "bm8": "block minifloat with stochastic rounding of weights and activations",
    "swalp8": "8-bit block floating point with stochastic rounding of weights",
    "fp134": "8-bit 1-3-4 with a per-tensor bias",
}

# The likely reason a recipe falls short, printed only for a policy that measurably does (loses more
# than CLOSE_BAR points or diverges in a seed). These are mechanisms, not results: the numbers
# that decide whether one is printed, and which, come from the runs. NAN_CAUSE is used instead of
# LIKELY_CAUSE when a policy's runs had steps with a NaN/inf loss.
NAN_CAUSE = ("a GEMM input outgrew its format's max in a role that neither scales nor saturates, and a format "
             "without an inf code marks such a value NaN, so the loss is NaN and the step is skipped (the loss "
             "scale is left alone: scaling cannot help a forward overflow). Activations grow as the weights "
             "train, so a run that crosses the limit tends to keep crossing it; `:sat` or a scaling fixes it.")
LIKELY_CAUSE = {
    "fp8_e4m3": "E4M3 for the gradients too: 3 mantissa bits and one amax scale per tensor. The scale is set by "
                "the largest entry of grad_output, so the many small entries land in E4M3's subnormals or round "
                "to zero (E4M3 spans about 2**-9 .. 448, under 18 binades from the top), and what survives "
                "carries a relative error of up to 1/16; E5M2 (mxfp8, hfp8) trades that mantissa bit for range.",
    "mxfp4": "E2M1 elements for every operand, gradients included: each value becomes one of 0, 0.5, 1, 1.5, "
             "2, 3, 4 or 6 times its block's power-of-two scale, so entries under about 1/16 of their block's "
             "maximum round to zero and the rest keep one mantissa bit (up to 25 % error). The weights stay fp32 "
             "between steps (a policy rounds them only where a GEMM reads them), so updates are not lost; the "
             "forward pass and the gradients are simply too coarse for this model. In trial runs at lr 0.01 the "
             "loss no longer blew up but the model still did not learn. The policy's ladder (levels mxfp6, "
             "mxfp8, ...) is the intended way out.",
    "mxfp6": "6-bit block elements for every GEMM operand, gradients included (E3M2 keeps two mantissa bits); "
             "blocks also run along the image width and, in the backward GEMMs, across the sum (see the policy "
             "file), so one large entry sets the scale of 31 unrelated ones.",
    "mxfp8": "blocks of 32 run along the image width (convolutions) and, in the backward GEMMs, across the sum "
             "rather than along it (see the policy file), so one large entry sets the scale of 31 unrelated ones.",
    "bm8": "block minifloat BM8 with stochastic rounding of weights and activations: (2,5) elements keep only "
           "four binades below the block maximum, and stochastic rounding of the weights on every read adds "
           "noise of up to one unit in the last place to each forward pass.",
    "swalp8": "8-bit block floating point with stochastic rounding of weights, activations and gradients: one "
              "exponent per tensor (per output channel for weights) leaves only 7 bits below the maximum, and "
              "rounding the weights stochastically on every read adds noise the optimizer has to average out "
              "(SWALP relies on weight averaging for that, which a policy does not provide).",
    "fp134": "1-3-4 elements with one power-of-two bias per tensor: only 8 binades of range, so with amax at the "
             "top, small activation and gradient entries underflow to zero.",
    "hfp8": "FP8 1-4-3 (bias 11, saturating at 30) forward, E5M2 gradients without scaling, and 16-bit e6m9 "
            "accumulation in chunks of 64: each of those rounds, and the gradients rely on the loss scale alone "
            "for range.",
    "fp16": "fp16 results (output, grad_input, grad_weight) as well as operands: gradient entries below "
            "fp16's subnormal range (2**-24) are lost unless the loss scale lifts them.",
    "bf16": "bf16 operands keep 8 bits of mantissa: each GEMM input carries a relative error of up to 2**-9.",
}


@dataclass
class Run:
    """One finished run, as recorded in its ``recipe.json``."""

    policy: str
    seed: int
    epochs: int
    test_accuracy: float  # %
    train_loss: float
    seconds_per_epoch: float  # the trainer's mean over epochs
    epoch_seconds: list[float]  # time in training steps, per epoch
    overflow_steps: int
    loss_scaler: str
    final_loss_scale: float
    wall_seconds: float
    finished: str  # local date and time the run ended
    machine: str  # what it ran on (machine_note)
    nonfinite_loss_steps: int  # steps whose (forward) loss was inf or NaN
    # The GEMM input, among those rounded to a format without scaling, that comes closest to (or
    # beyond) its format's max, for the final weights: {"op", "amax", "max"}; None if there is none.
    input_peak: dict | None
    # Values that the final model's roles round to zero (underflow) or past the format's range
    # (overflow), in one fp32 forward and backward of a training batch (see range_losses):
    # {"forward" | "gradient": {"underflow", "overflow", "values"}}.
    range_losses: dict

    @property
    def diverged(self) -> bool:
        return (not math.isfinite(self.train_loss) or self.train_loss > CHANCE_LOSS
                or self.test_accuracy < DIVERGED_BELOW)


def run_dir(runs: Path, policy: str, seed: int) -> Path:
    return runs / f"{policy}-seed{seed}"


def nonfinite_loss_steps(metrics: Path) -> int:
    """Steps of a run whose loss was inf or NaN, from its metrics.jsonl."""
    lines = (json.loads(line) for line in metrics.read_text().splitlines())
    return sum(1 for m in lines if "step" in m and not math.isfinite(m["loss"]))


@torch.no_grad()
def input_peak(trainer: Trainer) -> dict | None:
    """The GEMM input closest to (or beyond) its format's max, for the final weights.

    Among the GEMM-like ops whose input role rounds to a format without scaling (a scaled format
    fits any range), the largest |input| over the training set is taken from a plain fp32 forward
    of the final weights, and the op with the highest ratio to its format's max is returned.
    """
    limits = {}
    for op, assignment in trainer.compiled.assignments().items():  # keyed by fx node name
        setting = dict(assignment.roles).get("input")
        if setting is not None and setting.quant is not None and setting.quant.scaling == "none":
            limits[op] = setting.quant.fmt.max
    peaks = dict.fromkeys(limits, 0.0)

    def record(op: str):
        def hook(module, args):
            peaks[op] = max(peaks[op], float(args[0].abs().amax()))
        return hook

    hooks = [module.register_forward_pre_hook(record(name.replace(".", "_")))
             for name, module in trainer.model.named_modules() if name.replace(".", "_") in limits]
    try:
        for x, _ in batches(trainer.data, "train", 256, shuffle=False, seed=0, epoch=0):
            trainer.model(x)
    finally:
        for hook in hooks:
            hook.remove()
    if not hooks:
        return None
    op = max(peaks, key=lambda o: peaks[o] / limits[o])
    return {"op": op, "amax": peaks[op], "max": limits[op]}


FORWARD_ROLES = ("input", "weight", "bias", "output")


def range_losses(trainer: Trainer, batch_size: int = 256) -> dict:
    """How many values each role's format loses to underflow and overflow, for the final weights.

    One fp32 forward and backward of the first training batch (``batch_size`` images, unshuffled),
    the loss multiplied by the final loss scale as in training, records every role's tensor at each
    quantized module; each is rounded as its role says (scaling included; stochastic rounding with
    a fixed seed). Underflow: a nonzero value that rounds to zero. Overflow: a finite value beyond
    the format's max (an unscaled role) or that rounds to inf/NaN. The tensors come from the fp32
    model, so earlier layers' rounding is not compounded: a per-role measure, not a replay of a step.
    """
    assignments = trainer.compiled.assignments()  # keyed by fx node name
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def forward_hook(op: str):
        def hook(module, args, out):
            seen[op].update(input=args[0].detach(), weight=module.weight.detach(), output=out.detach())
            if module.bias is not None:
                seen[op]["bias"] = module.bias.detach()
        return hook

    def backward_hook(op: str):
        def hook(module, grad_input, grad_output):
            seen[op].update(grad_output=grad_output[0])
            if grad_input[0] is not None:
                seen[op]["grad_input"] = grad_input[0]
        return hook

    modules = {name.replace(".", "_"): m for name, m in trainer.model.named_modules()}
    modules = {op: modules[op] for op in assignments if op in modules and hasattr(modules[op], "weight")}
    hooks = []
    for op, module in modules.items():
        seen[op] = {}
        hooks += [module.register_forward_hook(forward_hook(op)), module.register_full_backward_hook(backward_hook(op))]
    x, y = next(iter(batches(trainer.data, "train", batch_size, shuffle=False, seed=0, epoch=0)))
    saved = [p.grad for p in trainer.model.parameters()]
    try:
        trainer.model.zero_grad(set_to_none=True)
        x = x.requires_grad_()  # so that the first layer's grad_input exists
        loss = torch.nn.functional.cross_entropy(trainer.model(x), y) * trainer.scaler.scale_value
        loss.backward()
        for op, module in modules.items():
            seen[op].update(grad_weight=module.weight.grad)
            if module.bias is not None:
                seen[op]["grad_bias"] = module.bias.grad
    finally:
        for hook in hooks:
            hook.remove()
        for p, g in zip(trainer.model.parameters(), saved):
            p.grad = g
    tally = {kind: {"underflow": 0, "overflow": 0, "values": 0} for kind in ("forward", "gradient")}
    for op, module in modules.items():
        axis = 1 if isinstance(module, torch.nn.modules.conv._ConvNd) else -1
        for role, setting in assignments[op].roles:
            values = seen[op].get(role)
            if setting.quant is None or values is None:
                continue
            spec, v = setting.quant, values.detach().double()
            scale = delayed_scale(spec, torch.zeros(1), v) if spec.scaling == "tensor_delayed" else None
            q = quantize_role(v, spec, axis=0 if role in ("weight", "grad_weight") else axis, seed=0, scale=scale)
            over = torch.isfinite(v) & ~torch.isfinite(q)
            if spec.scaling == "none" and not isinstance(spec.fmt, BlockFormat):
                over |= torch.isfinite(v) & (v.abs() > spec.fmt.max)
            t = tally["forward" if role in FORWARD_ROLES else "gradient"]
            t["underflow"] += int(((v != 0) & (q == 0)).sum())
            t["overflow"] += int(over.sum())
            t["values"] += v.numel()
    return tally


def train_one(policy: str, seed: int, epochs: int, runs: Path) -> Run:
    """Train one (policy, seed) from scratch into its run folder and record it."""
    out = run_dir(runs, policy, seed)
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start each run clean
    config = TrainConfig(model=MODEL, data=DATA, policy=policy, epochs=epochs, batch_size=BATCH_SIZE, lr=LR,
                         optimizer=OPTIMIZER, seed=seed, out=str(out))
    start = time.perf_counter()
    trainer = Trainer(config, progress=False)
    summary = trainer.fit()
    run = Run(policy=policy, seed=seed, epochs=summary["epochs"], test_accuracy=100 * summary["test_accuracy"],
              train_loss=summary["train_loss"], seconds_per_epoch=summary["seconds_per_epoch"],
              epoch_seconds=[h["seconds"] for h in trainer.history],
              overflow_steps=summary["overflow_steps"], loss_scaler=trainer.scaler.kind,
              final_loss_scale=trainer.scaler.scale_value, wall_seconds=time.perf_counter() - start,
              finished=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), machine=machine_note(),
              nonfinite_loss_steps=nonfinite_loss_steps(out / "metrics.jsonl"), input_peak=input_peak(trainer),
              range_losses=range_losses(trainer))
    (out / "recipe.json").write_text(json.dumps(run.__dict__, indent=2) + "\n")
    return run


def load_run(runs: Path, policy: str, seed: int) -> Run:
    path = run_dir(runs, policy, seed) / "recipe.json"
    if not path.is_file():
        sys.exit(f"{path} is missing: train it first (drop --from-runs)")
    return Run(**json.loads(path.read_text()))


# -- statistics -------------------------------------------------------------------------------------
def mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def std(xs: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single run."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def epoch_time(runs: list[Run]) -> float:
    """Median seconds per epoch over every epoch of ``runs``: robust to a moment of contention."""
    return statistics.median(s for r in runs for s in r.epoch_seconds)


def fmt_pct(x: float) -> str:
    return f"{x:.1f}"


def fmt_delta(d: float) -> str:
    return f"{d:+.1f}".replace("-", "\u2212")


# -- the markdown -----------------------------------------------------------------------------------
def machine_note() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, CPU only, {THREADS} torch thread (see THREADS in the script); "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def notes_for(policy: str, runs: list[Run], ref: float | None) -> str:
    """Short remarks for a table row, all derived from the runs."""
    accs = [r.test_accuracy for r in runs]
    notes = ["reference"] if policy == REFERENCE else []
    if len(runs) > 1:
        notes.append("per seed " + " / ".join(fmt_pct(a) for a in accs))
    diverged = [r for r in runs if r.diverged]
    if diverged:
        def why(r: Run) -> str:
            if not math.isfinite(r.train_loss):
                return "non-finite loss"
            if r.train_loss > CHANCE_LOSS:
                return f"loss {r.train_loss:.3g}"
            return f"{fmt_pct(r.test_accuracy)} %"
        notes.append("**diverged**: " + ", ".join(f"seed {r.seed} ({why(r)})" for r in diverged))
    if ref is not None and policy != REFERENCE and mean(accs) < ref - CLOSE_BAR:
        notes.append(f"{fmt_delta(mean(accs) - ref)} pts vs fp32")
    nonfinite = sum(r.nonfinite_loss_steps for r in runs)
    if nonfinite:
        notes.append(f"{nonfinite} steps with a NaN/inf loss")
    if any(r.loss_scaler == "dynamic" and r.final_loss_scale != INIT_LOSS_SCALE for r in runs):
        notes.append("loss scale ended at " + " / ".join(
            f"2^{math.log2(r.final_loss_scale):g}" if r.loss_scaler == "dynamic" else "none" for r in runs))
    if policy == REFERENCE:
        notes.append(f"bar >= {FP32_BAR:g} %: {'ok' if mean(accs) >= FP32_BAR else 'MISSED'}")
    if policy in CLOSE_POLICIES and ref is not None:
        notes.append(f"bar within {CLOSE_BAR:g} of fp32: {'ok' if mean(accs) >= ref - CLOSE_BAR else 'MISSED'}")
    return "; ".join(notes)


def table(results: dict[str, list[Run]]) -> list[str]:
    ref_runs = results.get(REFERENCE)
    ref_acc = mean([r.test_accuracy for r in ref_runs]) if ref_runs else None
    ref_time = epoch_time(ref_runs) if ref_runs else None
    lines = ["| policy | test accuracy (%) mean ± std | final train loss (mean) | time / epoch (x fp32) "
             "| overflow steps (total) | underflow % fwd / grad | overflow % fwd / grad | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for policy, runs in results.items():
        accs = [r.test_accuracy for r in runs]
        losses = [r.train_loss for r in runs]
        t = epoch_time(runs)
        ratio = f"{t * 1e3:.0f} ms ({t / ref_time:.1f}x)" if ref_time else f"{t * 1e3:.0f} ms (no fp32 run)"
        loss = f"{mean(losses):.4f}" if all(math.isfinite(x) for x in losses) else "non-finite"
        lines.append(f"| `{policy}` | {fmt_pct(mean(accs))} ± {fmt_pct(std(accs))} | {loss} | {ratio} "
                     f"| {sum(r.overflow_steps for r in runs)} | {range_share(runs, 'underflow')} "
                     f"| {range_share(runs, 'overflow')} | {notes_for(policy, runs, ref_acc)} |")
    return lines


def range_share(runs: list[Run], what: str) -> str:
    """Forward and gradient shares of values lost to ``what`` (range_losses), pooled over the runs."""
    def share(kind: str) -> str:
        lost = sum(r.range_losses[kind][what] for r in runs)
        total = sum(r.range_losses[kind]["values"] for r in runs)
        return "-" if total == 0 else "0" if lost == 0 else f"{100 * lost / total:.2g}"
    return f"{share('forward')} / {share('gradient')}"


def input_peaks(runs: list[Run]) -> str:
    """A sentence on how close the runs' GEMM inputs came to their unscaled format's max."""
    peaks = [r.input_peak for r in runs if r.input_peak]
    if not peaks:
        return ""
    return (" Largest input of a GEMM whose input format is unscaled, in a fp32 forward of the final weights "
            "over the training set, per seed: "
            + " / ".join(f"{pk['amax']:.1f} (`{pk['op']}`)" for pk in peaks)
            + f"; the format's max is {peaks[0]['max']:g}.")


def what_happens(results: dict[str, list[Run]]) -> list[str]:
    """The prose after the table, every number computed from the runs."""
    acc = {p: mean([r.test_accuracy for r in rs]) for p, rs in results.items()}
    out = ["## What happens", ""]
    if REFERENCE not in results:
        return out + ["No fp32 run in this set, so nothing is compared against it.", ""]
    ref, ref_runs = acc[REFERENCE], results[REFERENCE]
    n_test = load_dataset(DATA).size("test")
    ref_loss = mean([r.train_loss for r in ref_runs])

    verdicts = [f"fp32 reaches {fmt_pct(ref)} % (bar >= {FP32_BAR:g} %: **{'ok' if ref >= FP32_BAR else 'MISSED'}**)"]
    for p in CLOSE_POLICIES:
        if p in acc:
            verdicts.append(f"{p} {fmt_pct(acc[p])} % ({fmt_delta(acc[p] - ref)} pts; bar within {CLOSE_BAR:g}: "
                            f"**{'ok' if acc[p] >= ref - CLOSE_BAR else 'MISSED'}**)")
    out += ["**Bars.** " + "; ".join(verdicts) + ".", ""]

    def same_as_fp32(runs: list[Run]) -> bool:
        return [(r.seed, r.test_accuracy, r.train_loss) for r in runs] == \
            [(r.seed, r.test_accuracy, r.train_loss) for r in ref_runs]

    holding = [p for p in results if p != REFERENCE and acc[p] >= ref - CLOSE_BAR
               and not any(r.diverged for r in results[p])]
    short = [p for p in results if p != REFERENCE and p not in holding]
    if holding:
        gaps = [ref - acc[p] for p in holding]
        seeds = [r.test_accuracy for r in ref_runs]
        text = (f"**Within {CLOSE_BAR:g} points of fp32:** "
                + ", ".join(f"`{p}` ({fmt_delta(acc[p] - ref)})" for p in sorted(holding, key=lambda p: -acc[p]))
                + f". Their means lie {fmt_delta(-min(gaps))} to {fmt_delta(-max(gaps))} points from fp32's, at most "
                f"{max(abs(g) for g in gaps) * n_test / 100:.0f} of the {n_test} test images; "
                f"fp32's own seeds span {fmt_pct(min(seeds))} to {fmt_pct(max(seeds))} %, and the per-seed notes "
                "show where a single weak seed pulls a mean down.")
        clones = [p for p in holding if same_as_fp32(results[p])]
        if clones:
            text += (" " + ", ".join(f"`{p}`" for p in clones) + " reproduces fp32 run for run (same accuracy and "
                     "loss in every seed): it sets no format, so the compiled graph by itself changes nothing.")
        out += [text, ""]
    suspects = [p for p in holding if p in SUSPECT]
    spread = max(r.test_accuracy for r in ref_runs) - min(r.test_accuracy for r in ref_runs)
    if suspects:
        out += ["**Expected weak spots that hold here:** " + "; ".join(
            f"`{p}`, {SUSPECT[p]} ({fmt_delta(acc[p] - ref)})" for p in sorted(suspects, key=lambda p: acc[p]))
            + ". " + (f"None of these gaps exceeds fp32's own seed-to-seed spread ({spread:.1f} points): on a "
                      "model this small and a task this easy they do not show."
                      if max(ref - acc[p] for p in suspects) <= spread else
                      f"Some gaps exceed fp32's own seed-to-seed spread ({spread:.1f} points) while staying "
                      f"within the {CLOSE_BAR:g}-point bar."), ""]
    edgy = [p for p in holding if any(r.nonfinite_loss_steps for r in results[p])]
    for p in edgy:
        runs = results[p]
        line = (f"**`{p}` holds, but close to an edge.** Steps with a NaN/inf loss per seed: "
                + " / ".join(str(r.nonfinite_loss_steps) for r in runs) + "." + input_peaks(runs))
        out += [line + f" Why: {NAN_CAUSE}", ""]
    if short:
        out += [f"**Falling short** (more than {CLOSE_BAR:g} points below fp32, or diverged in some seed):", ""]
        for p in sorted(short, key=lambda p: acc[p]):
            runs = results[p]
            div = [r for r in runs if r.diverged]
            what = f"diverged in {len(div)} of {len(runs)} seeds" if div else "trains but loses accuracy"
            losses = " / ".join(f"{r.train_loss:.3g}" for r in runs)
            line = (f"- `{p}`: {fmt_pct(acc[p])} % ({fmt_delta(acc[p] - ref)} pts), {what}; final train loss per "
                    f"seed {losses} (fp32: {ref_loss:.2g}; a uniform guess: {CHANCE_LOSS:.2f}).")
            if any(r.nonfinite_loss_steps for r in runs):
                line += (" Steps with a NaN/inf loss per seed: "
                         + " / ".join(str(r.nonfinite_loss_steps) for r in runs) + "." + input_peaks(runs))
            cause = NAN_CAUSE if any(r.nonfinite_loss_steps for r in runs) else LIKELY_CAUSE.get(p)
            if cause:
                line += f" Likely why: {cause}"
            out.append(line)
        out.append("")

    skipped = {p: sum(r.overflow_steps for r in rs) for p, rs in results.items()}
    nonfinite = {p: sum(r.nonfinite_loss_steps for r in rs) for p, rs in results.items()}
    if any(skipped.values()):
        parts = []
        for p, n in skipped.items():
            if n:
                forward = min(nonfinite[p], n)  # a NaN/inf loss: the forward pass overflowed
                kinds = [f"{forward} with a NaN/inf loss (forward overflow)" if forward else "",
                         f"{n - forward} with a finite loss (gradient overflow)" if n - forward else ""]
                parts.append(f"`{p}` {n}: " + " and ".join(k for k in kinds if k))
        out += ["**Overflow steps** (skipped by the loss scaler because a gradient was not finite): "
                + "; ".join(parts) + ". No other policy skipped a step.", ""]
    else:
        out += ["**Overflow steps.** None: no gradient overflowed in any run.", ""]

    def lost(p: str, kind: str, what: str) -> float:
        runs = results[p]
        total = sum(r.range_losses[kind]["values"] for r in runs)
        return sum(r.range_losses[kind][what] for r in runs) / total if total else 0.0

    for what in ("underflow", "overflow"):
        ranked = sorted(((max(lost(p, k, what) for k in ("forward", "gradient")), p) for p in results), reverse=True)
        ranked = [(share, p) for share, p in ranked if share > 0]
        if not ranked:
            out += [f"**{what.capitalize()} of values.** None: no role of any policy lost a value to {what} "
                    f"on the final weights.", ""]
            continue
        worst = ", ".join(f"`{p}` {100 * lost(p, 'forward', what):.2g} % forward / "
                          f"{100 * lost(p, 'gradient', what):.2g} % gradient" for _, p in ranked[:3])
        out += [f"**{what.capitalize()} of values** on the final weights (table columns): largest in {worst}. "
                f"{len(ranked)} of {len(results)} policies lose any value to it."
                + (" Measured at the end of training, when the loss is near zero and so are most gradient "
                   "entries: gradient underflow is largest there, and matters least." if what == "underflow" else ""),
                ""]

    ref_time = epoch_time(ref_runs)
    times = {p: epoch_time(rs) / ref_time for p, rs in results.items() if p != REFERENCE}
    if times:
        order = sorted(times, key=times.get)
        out += [f"**Cost.** Time per epoch ranges from {times[order[0]]:.1f}x (`{order[0]}`) to "
                f"{times[order[-1]]:.1f}x (`{order[-1]}`) fp32's {ref_time * 1e3:.0f} ms. An epoch of this model is "
                "tiny, so the ratios mostly measure the fixed cost per emulated op (quantize calls, emulated "
                "accumulation, stochastic rounding's random bits), not arithmetic.", ""]

    out += [f"**Caveats.** The test set has {n_test} images, so one image is {100 / n_test:.2f} points, and "
            f"there are {len(ref_runs)} seed(s) per policy: differences under about a point are noise. lr {LR} with "
            "momentum 0.9 is close to the edge of stability for this model (choosing the setup, lr 0.1 diverged in "
            "fp32 in all 3 seeds over 30 epochs), which makes "
            "noisy recipes more likely to blow up than at a smaller lr. Times are wall-clock on a 2-core machine "
            "that other work shared; the median over epochs damps that, but ratios can be off by tens of percent.",
            ""]
    return out


def write_markdown(path: Path, results: dict[str, list[Run]]) -> None:
    everything = [r for rs in results.values() for r in rs]
    date = max(r.finished for r in everything)
    wall = sum(r.wall_seconds for r in everything)
    data = load_dataset(DATA)
    seeds = sorted({r.seed for rs in results.values() for r in rs})
    epochs = sorted({r.epochs for rs in results.values() for r in rs})
    header = [
        "# Shipped recipes on LeNet-5 / digits",
        "",
        f"Generated by `examples/recipes_digits.py` from runs finished {date}; regenerate with `{COMMAND}` "
        f"(or `{COMMAND} --from-runs` to rewrite this page from the saved runs in `runs/recipes/`).",
        "",
        f"- model: `{MODEL}` (LeNet-5 adapted to 8x8 inputs), data: `{DATA}` (sklearn, {data.size('train')} train "
        f"/ {data.size('test')} test, a fixed split)",
        f"- optimizer: {OPTIMIZER} (momentum 0.9), lr {LR}, batch {BATCH_SIZE}, "
        f"epochs {', '.join(map(str, epochs))}, seeds {', '.join(map(str, seeds))}; the same for every policy",
        "- loss scaling: the trainer's default (dynamic, starting at 2^16, when a policy rounds a gradient; "
        "none otherwise)",
        f"- machine: {'; '.join(sorted({r.machine for r in everything}))}",
        f"- the {len(everything)} runs took {wall / 60:.1f} min of wall time in all",
        "- time / epoch: training steps only (forward, backward, optimizer step; evaluation excluded), "
        "the median over every epoch of every seed (robust to moments when other work shared the machine), "
        "and its ratio to fp32's",
        f"- std: sample standard deviation over seeds; a run counts as diverged if it ends below "
        f"{DIVERGED_BELOW:g} % test accuracy (chance is 10 %), with a train loss above a uniform guess's "
        f"(ln 10 = {CHANCE_LOSS:.2f}) or with a non-finite one",
        "- overflow steps: steps the loss scaler skipped because a gradient was inf/NaN (a NaN/inf loss makes "
        "every gradient so)",
        "- underflow / overflow %: of the values each quantized role rounds (forward: input, weight, bias, output; "
        "grad: grad_output, grad_input, grad_weight, grad_bias), the share that rounds to zero from nonzero "
        "(underflow) or lies beyond the format's max (overflow; saturated or turned inf/NaN), pooled over seeds; "
        "measured on the final weights in one fp32 forward and backward of 256 training images with the loss "
        "multiplied by the final loss scale, each role rounded as the policy says, scaling included; "
        "`-` where the policy rounds no such role",
    ]
    recipes = ["## The recipes", ""] + [f"- `{p}`: {load_policy(p).description or '(no description)'}"
                                        for p in results] + [""]
    text = "\n".join(header + [""] + table(results) + [""] + what_happens(results) + recipes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--policies", default=None, help="comma-separated subset of the shipped policies")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "recipes", help="where the run folders go")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results" / "recipes_digits.md")
    parser.add_argument("--from-runs", action="store_true", help="train nothing; rewrite --doc from the saved runs")
    args = parser.parse_args()

    torch.set_num_threads(THREADS)
    # A policy with a trust_region section trains with the dynamic-precision controller, not the
    # fixed setup compared here: examples/trust_region_digits.py measures those.
    shipped = [p for p in shipped_policies() if load_policy(p).trust_region is None]
    policies = shipped if args.policies is None else [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in shipped]
    if unknown:
        parser.error(f"not shipped: {', '.join(unknown)}; shipped policies are {', '.join(shipped)}")
    # fp32 first: every other row is compared against it.
    policies = sorted(policies, key=lambda p: p != REFERENCE)
    seeds = [int(s) for s in args.seeds.split(",")]

    begin = time.perf_counter()
    results: dict[str, list[Run]] = {}
    for policy in policies:
        results[policy] = []
        for seed in seeds:
            if args.from_runs:
                run = load_run(args.runs, policy, seed)
            else:
                run = train_one(policy, seed, args.epochs, args.runs)
                print(f"{policy:10s} seed {seed}  test {run.test_accuracy:5.1f} %  loss {run.train_loss:.4f}  "
                      f"{run.seconds_per_epoch * 1e3:6.0f} ms/epoch  overflows {run.overflow_steps}  "
                      f"({run.wall_seconds:.1f} s)", flush=True)
            results[policy].append(run)
    write_markdown(args.doc, results)
    print(f"wrote {args.doc} ({(time.perf_counter() - begin) / 60:.1f} min)")


if __name__ == "__main__":
    main()
