"""HALP against SGD, LP-SGD, SVRG and LP-SVRG on strongly convex problems (De Sa, Leszczynski et al.
2018, "High-Accuracy Low-Precision Training").

Three problems from scikit-learn's bundled data sets (nothing downloads), features standardised
and a constant feature appended for the intercept: L2-regularised multinomial logistic
regression on ``digits`` (10 classes), L2-regularised logistic regression on ``breast_cancer``
and ridge least squares on ``diabetes`` (target standardised too). The L2 term
``lam / 2 ||theta||^2`` covers every parameter, intercept included, so each objective is exactly
``lam``-strongly convex. Its optimum f* comes from Newton's method in float64 down to a gradient
norm of ``GRAD_TOL``. The models compute in float64 throughout; the low precision is in what the
optimizers store:

- SGD, SVRG: float64 weights;
- LP-SGD, LP-SVRG: the weights stored in 8-bit fixed point ``fixed(8, f)``, stochastic rounding,
  with f the largest number of fractional bits whose range holds max|theta*| (a weight that
  leaves the range saturates at its end);
- HALP: an 8-bit offset around a float64 anchor, re-centred every ``T`` steps, mu = lam.

Each method runs from zero for every step size of one grid, 3 seeds (batch order and rounding),
and keeps the step size whose f - f* after the last epoch is lowest on average over the seeds. The
script prints, per problem and method, the chosen step size and f - f* at a few epochs (mean and
range over the seeds), checks the done-bar on digits (HALP at the last epoch at least 50x below
LP-SGD and LP-SVRG, and at least 10x lower than 10 epochs before), and plots f - f* against
epochs for each problem (mean over the seeds, min-max band) to ``--plots``.

    OMP_NUM_THREADS=1 .venv/bin/python examples/halp_convex.py            # about 5 minutes on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python examples/halp_convex.py --quick    # smoke run: 1 seed, 1 lr, 4 epochs
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

from mpcompile.formats import FixedFormat
from mpcompile.policy import OptimizerSettings
from mpcompile.runtime.optim import HALP, LPSVRG, SVRG, LowPrecisionOptimizer, VarianceReduced

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("SGD", "LP-SGD", "SVRG", "LP-SVRG", "HALP")
BITS = 8  # word length of LP-SGD's and LP-SVRG's weights and of HALP's offset
GRAD_TOL = 1e-12  # Newton's method stops at this gradient norm
FLOOR = 1e-16  # f - f* below this is float64 rounding of f: plotted at the floor
BAR_RATIO, BAR_GAIN, BAR_WINDOW = 50.0, 10.0, 10  # the done-bar on digits
THREADS = 1  # the problems are too small to gain from more threads


@dataclass(frozen=True)
class Setup:
    """What every run shares."""

    lam: float = 0.05  # L2 strength, also HALP's mu
    batch: int = 32
    T_epochs: int = 1  # SVRG / LP-SVRG / HALP: epochs between full gradients
    epochs: int = 40
    lrs: tuple[float, ...] = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4)
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = Setup(epochs=4, lrs=(0.1,), seeds=(0,))


@dataclass(frozen=True)
class Problem:
    """A regularised linear model: f(theta) = mean_i loss(theta x_i, y_i) + lam / 2 ||theta||^2."""

    name: str
    features: torch.Tensor  # (n, d + 1), float64, standardised, the last column ones
    targets: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # mean loss of outputs (n, k) against targets
    outputs: int
    lam: float

    @property
    def size(self) -> int:
        return len(self.features)

    @property
    def shape(self) -> tuple[int, int]:
        """theta's shape: (outputs, features + 1)."""
        return self.outputs, self.features.shape[1]

    def objective(self, theta: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """f at ``theta`` (outputs, d + 1), over the rows ``rows`` (all rows: None)."""
        x, y = (self.features, self.targets) if rows is None else (self.features[rows], self.targets[rows])
        return self.loss(x @ theta.T, y) + 0.5 * self.lam * theta.square().sum()


def _softmax(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z, y)


def _logistic(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(z[:, 0], y)


def _squares(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (z[:, 0] - y).square().mean()


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std(0)
    return (x - x.mean(0)) / torch.where(std > 0, std, 1.0)  # digits has constant (all-zero) pixels


# name -> (sklearn loader, loss, outputs, the targets as the loss takes them)
PROBLEMS = {"digits": (load_digits, _softmax, 10, lambda y: y.long()),
            "breast_cancer": (load_breast_cancer, _logistic, 1, lambda y: y.double()),
            "diabetes": (load_diabetes, _squares, 1, lambda y: _standardise(y.double()))}


def load(name: str, lam: float) -> Problem:
    """A problem of ``PROBLEMS`` with L2 strength ``lam``."""
    loader, loss, outputs, targets = PROBLEMS[name]
    x, y = (torch.tensor(a) for a in loader(return_X_y=True))
    features = torch.cat([_standardise(x.double()), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    return Problem(name, features, targets(y), loss, outputs, lam)


def optimum(problem: Problem, max_iter: int = 50) -> torch.Tensor:
    """theta* by damped Newton in float64 (full steps once the Newton decrement is below 1/4)."""
    theta = torch.zeros(math.prod(problem.shape), dtype=torch.float64)

    def f(flat: torch.Tensor) -> torch.Tensor:
        return problem.objective(flat.view(problem.shape))

    for _ in range(max_iter):
        grad = torch.func.grad(f)(theta)
        if grad.norm() <= GRAD_TOL:
            return theta.view(problem.shape)
        step = torch.linalg.solve(torch.func.jacrev(torch.func.jacrev(f))(theta), grad)
        decrement = float(grad @ step) ** 0.5
        theta = theta - (step if decrement < 0.25 else step / (1 + decrement))
    raise RuntimeError(f"{problem.name}: Newton's method did not reach gradient norm {GRAD_TOL} in {max_iter} steps")


def weight_format(theta_star: torch.Tensor) -> FixedFormat:
    """fixed(BITS, f) with the largest f whose range holds max|theta*|."""
    return FixedFormat(BITS, math.floor(math.log2((2 ** (BITS - 1) - 1) / float(theta_star.abs().max()))))


def _backward(problem: Problem, theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    loss = problem.objective(theta, rows)
    loss.backward()
    return loss


def make_optimizer(method: str, theta: torch.Tensor, lr: float, T: int, full_grad: Callable[[], None],
                   fmt: FixedFormat, lam: float, seed: int) -> torch.optim.Optimizer | LowPrecisionOptimizer:
    """``method`` of ``METHODS`` over ``theta``; the rounding of the low-precision ones is seeded with ``seed``."""
    if method in ("SGD", "LP-SGD"):
        sgd = torch.optim.SGD([theta], lr=lr)
        return sgd if method == "SGD" else LowPrecisionOptimizer(
            sgd, OptimizerSettings(master=fmt, update_rounding="stochastic"), seed=seed)
    if method == "SVRG":
        return SVRG([theta], lr=lr, T=T, full_grad=full_grad)
    if method == "LP-SVRG":
        return LPSVRG([theta], lr=lr, T=T, full_grad=full_grad, master=fmt, rounding="stochastic", seed=seed)
    return HALP([theta], lr=lr, T=T, full_grad=full_grad, mu=lam, bits=BITS, rounding="stochastic", seed=seed)


def run(problem: Problem, method: str, lr: float, seed: int, setup: Setup, f_star: float,
        fmt: FixedFormat) -> list[float]:
    """f - f* at the start and after each epoch (inf from the first non-finite value on)."""
    theta = torch.zeros(problem.shape, dtype=torch.float64, requires_grad=True)
    steps = math.ceil(problem.size / setup.batch)
    opt = make_optimizer(method, theta, lr, setup.T_epochs * steps, lambda: problem.objective(theta).backward(),
                         fmt, problem.lam, seed)
    order = torch.Generator().manual_seed(seed)
    gaps = [float(problem.objective(theta.detach())) - f_star]
    for _ in range(setup.epochs):
        for rows in torch.randperm(problem.size, generator=order).split(setup.batch):
            closure = functools.partial(_backward, problem, theta, rows)
            if isinstance(opt, VarianceReduced):
                opt.step(closure)  # zeroes .grad itself, before each of its closure calls
            else:
                opt.zero_grad()
                closure()
                opt.step()
        gap = float(problem.objective(theta.detach())) - f_star
        if not math.isfinite(gap):  # diverged
            return gaps + [math.inf] * (setup.epochs + 1 - len(gaps))
        gaps.append(gap)
    return gaps


@dataclass(frozen=True)
class Result:
    """One method on one problem: the grid's mean final f - f* per step size, the curves at the best."""

    method: str
    lr: float  # the step size with the lowest mean final f - f*
    final: dict[float, float]  # lr -> f - f* after the last epoch, mean over the seeds
    curves: torch.Tensor  # (seeds, epochs + 1): f - f* per seed and epoch at ``lr``

    @property
    def mean(self) -> torch.Tensor:
        return self.curves.mean(0)


def sweep(problem: Problem, method: str, setup: Setup, f_star: float, fmt: FixedFormat) -> Result:
    """Every step size of the grid, every seed; the curves of the step size with the lowest mean final f - f*."""
    curves = {lr: torch.tensor([run(problem, method, lr, seed, setup, f_star, fmt) for seed in setup.seeds],
                               dtype=torch.float64) for lr in setup.lrs}
    final = {lr: float(c[:, -1].mean()) for lr, c in curves.items()}
    best = min(final, key=final.__getitem__)
    return Result(method, best, final, curves[best])


def report_epochs(epochs: int) -> list[int]:
    """The epochs the tables show: every quarter of the run."""
    return sorted({round(epochs * q / 4) for q in range(1, 5)})


def print_results(results: list[Result], epochs: int) -> None:
    """f - f* (mean over the seeds [min, max]) at some epochs at each method's best lr, then the grid."""
    at = report_epochs(epochs)
    print(f"  {'method':8s} {'best lr':>7s}  " + "  ".join(f"{'epoch ' + str(e):>29s}" for e in at))
    for r in results:
        print(f"  {r.method:8s} {r.lr:7g}  " + "  ".join(
            f"{float(r.mean[e]):9.2e} [{float(r.curves[:, e].min()):8.2e}, {float(r.curves[:, e].max()):8.2e}]"
            for e in at))
    lrs = list(results[0].final)
    print(f"  {f'mean f - f* at epoch {epochs}, per lr:':32s} " + " ".join(f"{lr:>9g}" for lr in lrs))
    for r in results:
        print(f"  {r.method:32s} " + " ".join(f"{r.final[lr]:9.2e}" for lr in lrs))


def check_bar(results: list[Result], epochs: int) -> None:
    """HALP's mean f - f* at the last epoch against LP-SVRG's and LP-SGD's, and its gain over the last window."""
    mean = {r.method: r.mean.clamp_min(FLOOR) for r in results}  # below the floor f - f* is rounding noise
    halp = float(mean["HALP"][-1])
    for other in ("LP-SVRG", "LP-SGD"):
        ratio = float(mean[other][-1]) / halp
        print(f"  HALP {halp:.2e} vs {other} {float(mean[other][-1]):.2e} at epoch {epochs}: {ratio:.3g}x below "
              f"(bar >= {BAR_RATIO:g}x): {'met' if ratio >= BAR_RATIO else 'MISSED'}")
    start = max(epochs - BAR_WINDOW, 0)
    gain = float(mean["HALP"][start]) / halp
    print(f"  HALP epochs {start} -> {epochs}: {float(mean['HALP'][start]):.2e} -> {halp:.2e}, {gain:.3g}x "
          f"(bar >= {BAR_GAIN:g}x): {'met' if gain >= BAR_GAIN else 'MISSED'}")


def plot(path: Path, problem: Problem, results: list[Result], fmt: FixedFormat, setup: Setup) -> None:
    """f - f* against epochs, log scale: the mean over the seeds, the min-max band around it."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    epochs = torch.arange(setup.epochs + 1)
    for i, r in enumerate(results):
        curves = r.curves.clamp_min(FLOOR)
        ax.plot(epochs, r.mean.clamp_min(FLOOR), color=f"C{i}", label=f"{r.method} (lr {r.lr:g})")
        ax.fill_between(epochs, curves.min(0).values, curves.max(0).values, color=f"C{i}", alpha=0.2, lw=0)
    ax.axhline(FLOOR, color="grey", ls=":", lw=0.8, label=f"float64 floor (lower values drawn at {FLOOR:g})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (passes of stochastic steps over the data)")
    ax.set_ylabel("f - f*")
    ax.set_title(f"{problem.name}: lam {problem.lam:g}, batch {setup.batch}, LP weights {fmt}, HALP {BITS} bits",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "results", help="where halp_<problem>.png go")
    args = parser.parse_args()
    setup = QUICK if args.quick else Setup()
    torch.set_num_threads(THREADS)
    begin = time.perf_counter()
    print(f"{setup}; HALP mu = lam, {BITS} bits; LP-SGD / LP-SVRG stochastic rounding")
    for name in PROBLEMS:
        problem = load(name, setup.lam)
        theta_star = optimum(problem)
        f_star = float(problem.objective(theta_star))
        grad_norm = float(torch.func.grad(problem.objective)(theta_star).norm())
        fmt = weight_format(theta_star)
        print(f"{name}: n {problem.size}, d {problem.shape[1] - 1}, f* {f_star:.15g} (gradient norm "
              f"{grad_norm:.1e}), max|theta*| {float(theta_star.abs().max()):.3f}, LP weights {fmt} "
              f"(max {fmt.max:g}, spacing {fmt.eps:g})", flush=True)
        results = [sweep(problem, method, setup, f_star, fmt) for method in METHODS]
        print_results(results, setup.epochs)
        if name == "digits":
            check_bar(results, setup.epochs)
        args.plots.mkdir(parents=True, exist_ok=True)
        plot(args.plots / f"halp_{name}.png", problem, results, fmt, setup)
        print(f"  ({(time.perf_counter() - begin) / 60:.1f} min so far)", flush=True)
    print(f"wrote {args.plots}/halp_{{{','.join(PROBLEMS)}}}.png in {(time.perf_counter() - begin) / 60:.1f} min")


if __name__ == "__main__":
    main()
