"""A tiny GPT-2 trained from scratch as a character-level language model in fp32, hfp8 and mxfp8.

transformers' ``GPT2LMHeadModel`` (random weights from a ``GPT2Config``) learns the next character of
a few standard-library modules' source (the last 10 % held out), compiled under each shipped policy.
Every run starts from the same weights and batches and scales the loss as mpcompile's trainer does;
a fourth run trains hfp8 without loss scaling. Writes ``OUT/gpt2_fp8.md`` and ``OUT/gpt2_fp8.png``.

    .venv/bin/python examples/gpt2_fp8.py                     # about 5 min on 2 cores
    .venv/bin/python examples/gpt2_fp8.py --steps 20 --out /tmp/g
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import matplotlib
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import mpcompile
from mpcompile.runtime import DynamicLossScaler, StaticLossScaler

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

ROOT = Path(__file__).resolve().parent.parent
TEXT_MODULES = ("argparse", "textwrap", "difflib", "collections")
RUNS = (("fp32", True), ("hfp8", True), ("mxfp8", True), ("hfp8", False))  # (policy, dynamic loss scaling)
TABLE_POLICY, TABLE_ROWS = "hfp8", 8  # whose op table is printed, and how many of its rows
N_EMBD, N_LAYER, N_HEAD, CONTEXT = 64, 2, 4, 64
BATCH_SIZE, LR, STEPS, SEED, LOG_EVERY = 16, 3e-3, 200, 0, 25
VAL_FRACTION, VAL_BATCH = 0.1, 32  # held out; windows per validation batch (one batch of all is much slower)
BEHIND = 0.1  # nats: an unscaled run this far above its scaled twin's validation loss gets an explanation
THREADS = 1  # the model is too small to gain from a second thread, and one keeps times steady on a shared machine


@dataclass
class Result:
    """One run."""

    policy: str
    scaled: bool  # dynamic loss scaling
    losses: list[float]  # train loss at every step
    skipped: int  # steps the loss scaler skipped for an overflow
    val_loss: float  # nats per character
    seconds: float  # compile, training and validation

    @property
    def label(self) -> str:
        return self.policy if self.scaled else f"{self.policy}, no loss scaling"

    @property
    def train_loss(self) -> float:
        """The mean train loss over the last LOG_EVERY steps."""
        return fmean(self.losses[-LOG_EVERY:])


def load_text() -> tuple[str, torch.Tensor]:
    """The vocabulary (every character of the text, sorted) and the text as its indices."""
    text = "".join(inspect.getsource(importlib.import_module(name)) for name in TEXT_MODULES)
    chars = "".join(sorted(set(text)))
    return chars, torch.tensor([chars.index(c) for c in text])


def build_model(vocab: int, seed: int) -> GPT2LMHeadModel:
    """A fresh GPT-2 without dropout, so that two runs differ by their precision only."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
                                      n_positions=CONTEXT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=None, eos_token_id=None, use_cache=False))


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next character (``targets``: ``inputs`` shifted by one)."""
    return F.cross_entropy(model(input_ids=inputs).logits.flatten(0, 1), targets.flatten())


def random_batch(ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH_SIZE windows of CONTEXT characters at random places, and the characters that follow each."""
    starts = torch.randint(0, len(ids) - CONTEXT, (BATCH_SIZE,), generator=generator).tolist()
    return (torch.stack([ids[s:s + CONTEXT] for s in starts]),
            torch.stack([ids[s + 1:s + CONTEXT + 1] for s in starts]))


@torch.no_grad()
def validate(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean loss over every non-overlapping window of CONTEXT characters of ``ids``."""
    n = (len(ids) - 1) // CONTEXT
    inputs, targets = (ids[i:i + n * CONTEXT].view(n, CONTEXT).split(VAL_BATCH) for i in (0, 1))
    return sum(lm_loss(model, x, y).item() * len(x) for x, y in zip(inputs, targets)) / n


def run(policy: str, scaled: bool, ids: torch.Tensor, vocab: int, args: argparse.Namespace) -> Result:
    """Train a fresh model under ``policy`` on the text ``ids`` but its end, then measure it on that end."""
    start = time.perf_counter()
    train, val = ids.split(int(len(ids) * (1 - VAL_FRACTION)))
    model = build_model(vocab, args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches in every run
    cm = mpcompile.compile(model, policy, example_kwargs={"input_ids": random_batch(train, generator)[0]})
    if (policy, scaled) == (TABLE_POLICY, True):  # the policy line, the header and its rule, TABLE_ROWS rows
        print(f"{policy}'s table, first rows:\n" + "\n".join(cm.table().splitlines()[:TABLE_ROWS + 3]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scaler = DynamicLossScaler() if scaled else StaticLossScaler(1.0)  # a scale of 1: no scaling
    cm.train()
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        loss = lm_loss(cm, *random_batch(train, generator))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        skip = scaler.unscale_(model.parameters())  # True for a gradient that is not finite
        if not skip:
            optimizer.step()
        scaler.update(skip)
        losses.append(loss.item())
        if step % LOG_EVERY == 0:
            print(f"{policy:6s} scaled {scaled!s:5s} step {step:4d}  loss {fmean(losses[-LOG_EVERY:]):.4f}", flush=True)
    cm.eval()
    return Result(policy, scaled, losses, scaler.overflow_steps, validate(cm, val), time.perf_counter() - start)


def table(results: list[Result]) -> list[str]:
    return ["| precision | loss scaling | final train loss | validation loss | bits per character | seconds |",
            "|---|---|---|---|---|---|",
            *(f"| `{r.policy}` | {'dynamic' if r.scaled else 'none'} | {r.train_loss:.4f} | {r.val_loss:.4f} | "
              f"{r.val_loss / math.log(2):.3f} | {r.seconds:.0f} |" for r in results)]


def write_results(results: list[Result], chars: int, vocab: int, args: argparse.Namespace, wall: float) -> None:
    """``gpt2_fp8.md`` (setup, table, what the numbers say) and ``gpt2_fp8.png`` (train loss per step)."""
    base, unscaled = results[0], next(r for r in results if not r.scaled)
    twin, lows = results[RUNS.index((unscaled.policy, True))], [r.train_loss for r in results if r.scaled]
    gaps = "; ".join(f"{r.label} {r.val_loss - base.val_loss:+.3f} nats in {r.seconds / base.seconds:.1f}x the time"
                     for r in results[1:])
    behind = (f" Without loss scaling {unscaled.policy} falls behind and ends at {unscaled.train_loss:.2f}: its "
              f"gradients (grad_output, E5M2 without a scale) round entries under 2^-17 to zero, and with the loss a "
              f"mean over {BATCH_SIZE * CONTEXT} characters most entries reaching the attention and MLP input "
              f"projections are that small (mxfp8 scales each block of 32)."
              if unscaled.val_loss - twin.val_loss > BEHIND else "")
    lines = [
        "# A tiny GPT-2 on characters: fp32, hfp8, mxfp8", "",
        f"Command: `.venv/bin/python examples/gpt2_fp8.py --steps {args.steps} --seed {args.seed}` ({wall:.0f} s).", "",
        f"- text: the source code of the standard-library modules {', '.join(f'`{m}`' for m in TEXT_MODULES)} "
        f"(`inspect.getsource`, concatenated; Python {platform.python_version()}), "
        f"{chars:,} characters, {vocab} distinct; the last {VAL_FRACTION:.0%} held out",
        f"- model: transformers' `GPT2LMHeadModel`, {N_LAYER} layers, width {N_EMBD}, {N_HEAD} heads, context "
        f"{CONTEXT}, dropout off, random weights from seed {args.seed}; `mpcompile.compile(model, POLICY, "
        f"example_kwargs={{\"input_ids\": ...}})` with the shipped policies, captured by torch.export",
        f"- training: AdamW, lr {LR}, {args.steps} steps of {BATCH_SIZE} random windows of {CONTEXT} characters (the "
        f"same in every run); loss scaling: mpcompile's `DynamicLossScaler` (2^16 to start), as its trainer does; "
        f"one seed, so the spread between seeds is not measured (run again with --seed)",
        f"- final train loss: the mean over the last {LOG_EVERY} steps; validation loss: mean cross-entropy (nats) "
        f"over every non-overlapping window of the held-out text, in eval mode; bits per character: it / ln 2",
        f"- seconds: compile, training and validation, wall clock, {THREADS} torch thread, torch {torch.__version__}, "
        f"on a 2-core CPU machine that other work shared", "",
        *table(results), "",
        f"With loss scaling the train loss falls from {base.losses[0]:.2f} at the first step (a uniform guess: ln "
        f"{vocab} = {math.log(vocab):.2f}) to {min(lows):.2f}-{max(lows):.2f} in every precision; validation loss "
        f"against fp32's {base.val_loss:.3f}: {gaps} ({sum(r.skipped for r in results)} steps skipped for an "
        f"overflow in all). hfp8 keeps the first GEMM (the first attention projection) and the last (the tied output "
        f"layer) in fp32; mxfp8 quantizes every GEMM.{behind}", "", "![train loss per step](gpt2_fp8.png)", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpt2_fp8.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="tight")
    for r in results:
        ax.plot(range(1, len(r.losses) + 1), r.losses, lw=1, label=f"{r.label} (validation {r.val_loss:.3f})")
    ax.axhline(math.log(vocab), color="grey", ls=":", lw=1, label=f"uniform guess, ln {vocab}")
    ax.set(xlabel="step", ylabel="train loss (nats per character)", ylim=(None, math.log(vocab) + 0.1),
           title=f"GPT-2 ({N_LAYER} layers, width {N_EMBD}) on characters of Python source")
    ax.legend()
    fig.savefig(args.out / "gpt2_fp8.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    chars, ids = load_text()
    begin = time.perf_counter()
    results = [run(policy, scaled, ids, len(chars), args) for policy, scaled in RUNS]
    wall = time.perf_counter() - begin
    print("\n".join(table(results)))
    write_results(results, len(ids), len(chars), args, wall)
    print(f"wrote gpt2_fp8.md and gpt2_fp8.png to {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
