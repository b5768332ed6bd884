"""Train a compiled model: progress, metrics, plots and checkpoints that resume bit-identically.

A run folder holds ``metrics.jsonl`` (one line per step and per epoch), ``summary.json``,
``table.txt`` (the compiled model's table at the end: formats, and the kappa and statistics
of the last calibration), ``curves.png`` (loss and accuracy against epochs) and
``checkpoint.pt``, written after every epoch and on Ctrl-C; a monitored run (``monitor``) also
``monitor.jsonl``, TensorBoard files in ``tb/`` and ``memory.json`` (``runtime.memory``), which
``mpcompile report`` turns into ``report.html``. The checkpoint carries the model,
optimizer, loss scaler, policy level, the RNG states of torch, python and numpy, and the
position in the epoch; the data order is a function of (seed, epoch), so ``resume``
continues exactly where the run stopped.

Calibration: where the policy reads kappa (kappa rules, recompute), the trust region's
``bound`` or ``per_layer`` does, or ``stats`` is asked for, the model is compiled with the
first ``calibration_batches`` training batches, on which the condition and stats passes run,
and again at each recompile that changes formats (``CompiledModel.recompile``). A checkpoint
keeps the kappa estimates rules selected with.

A step whose gradients overflow is skipped and the loss scaler backs off; a step whose loss is
already inf/NaN (the forward overflowed a format) is skipped without touching the scale, which
could not help, and counted as a ``nan_loss_steps``. Skipped steps stay out of the epoch's
train loss and accuracy.

The optimizer is the policy's ``optimizer.kind`` (or ``TrainConfig.optimizer``; the two may not
disagree). The variance-reduced kinds (svrg, lpsvrg, halp) take each step from two gradients of
the batch, at w and at the anchor, and their full gradient from the whole training split in
batches of 256; the loss scaler checks each of these gradients (so it counts two or more checks
per step), and one that overflows abandons the step. ``swalp`` adds, once averaging has started,
the averaged model's test accuracy (batch norms recomputed for it) to each epoch's record.

A policy with a ``trust_region:`` section trains with the dynamic-precision controller
(``trust_region.TrustRegion``) instead of the optimizer: it takes the steps and moves the model
along the policy's ``levels``. Its checks go to ``metrics.jsonl``, the summary gains ``levels``
(iterations at each level), ``recompiles`` and ``recompile_seconds``, and ``trust_region.png``
plots loss, Delta and the level against iterations.

Run by torchrun (or ``mpcompile train --nproc N``), each process is one rank of a data-parallel
run (``distributed.DataParallel``): the compiled model under DDP, gradients sent in the policy's
``communication`` format, every rank on its share of each global batch, rank 0 writing the run
folder, every rank's communication state in the checkpoint. With ``fsdp`` the model is sharded
by FSDP2 instead (``DataParallel.shard``); its checkpoint holds whole tensors, gathered from the
shards, and each rank takes its shards back on resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compiler import CompiledModel, compile
from ..errors import MpcompileError
from ..models import MODELS, build_model
from ..policy import MonitorSettings, load_policy
from .data import Dataset, batches, load_dataset, num_batches
from .distributed import DataParallel
from .distributed.data_parallel import PARAM_DTYPES
from .distributed.sharded_state import full_tensors, shard_like
from .memory import memory_report
from .model_objective import ModelObjective
from .monitor import Monitor
from .optim import OPTIMIZERS, SWALP, VARIANCE_REDUCED, make_optimizer, optimizer_kind
from .scaling import LossScaler, make_loss_scaler
from .trust_region import TrustRegion, check_record

__all__ = ["TrainConfig", "Trainer", "train", "model_for", "SCHEDULES"]

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class TrainConfig:
    """What a run is. ``loss_scale``: None (dynamic when the policy rounds any gradient, else
    none), ``"none"``, ``"dynamic"`` or a number (static). ``schedule``: ``constant`` lr, or
    ``cosine``, lr * (1 + cos(pi * t / T)) / 2 at step t of T (a function of the step, so a
    resumed run follows it exactly). ``calibration_batches``: training batches calibration
    measures (see the module docstring); ``stats``: measure format statistics even where the
    policy reads no kappa; ``monitor``: record number statistics every that many steps (the
    policy's ``monitor:`` section, or its defaults, with this ``every``; see ``runtime.monitor``);
    ``fsdp``: in a data-parallel run, shard the model with FSDP2 instead of DDP, its parameters
    gathered in this dtype (``fp32``, ``bf16`` or ``fp16``; see ``distributed.DataParallel.shard``).

    The defaults (10 epochs, SGD with momentum 0.9, lr 0.05 on a cosine schedule, batch 32) take
    lenet5 on digits to about 97.5 % test accuracy in fp32 (mean over seeds 0, 1, 2) in seconds on
    a CPU; ``hfp8`` and the shipped ``trust_region`` policy end within a point of it."""

    model: str = "lenet5"
    data: str = "digits"
    policy: str = "fp32"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str | None = None
    seed: int = 0
    out: str = "runs/run"
    data_dir: str | None = None
    loss_scale: str | float | None = None
    level: int | str = 0
    device: str = "cpu"
    schedule: str = "cosine"
    calibration_batches: int = 4
    stats: bool = False
    monitor: int | None = None
    fsdp: str | None = None

    def check(self) -> None:
        """Refuse what cannot train, before anything is built."""
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise MpcompileError(f"batch size {self.batch_size} must be a positive integer")
        if not self.lr > 0:
            raise MpcompileError(f"learning rate {self.lr} must be positive")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise MpcompileError(f"calibration batches {self.calibration_batches} must be a positive integer")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise MpcompileError(f"epochs {self.epochs} must be a non-negative integer")
        if self.schedule not in SCHEDULES:
            raise MpcompileError(f"unknown lr schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise MpcompileError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.fsdp is not None and self.fsdp not in PARAM_DTYPES:
            raise MpcompileError(f"--fsdp {self.fsdp!r}: the dtype FSDP2 gathers parameters in is one of "
                                 f"{', '.join(PARAM_DTYPES)}")
        if self.monitor is not None and (isinstance(self.monitor, bool) or not isinstance(self.monitor, int)
                                         or self.monitor < 1):
            raise MpcompileError(f"monitor every {self.monitor!r} steps: give a positive number of steps")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise MpcompileError(f"device {self.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MpcompileError(f"device {self.device!r}: this machine has no CUDA device; use --device cpu")


def model_for(name: str, data: Dataset) -> nn.Module:
    """Model ``name`` shaped for ``data`` (input channels and size, number of classes)."""
    c, h, w = data.input_shape
    sizes = {"lenet5": {"in_channels": c, "image_size": h}, "mlp": {"in_features": c * h * w},
             "logreg": {"in_features": c * h * w}, "resnet20": {"in_channels": c}}
    if name in MODELS:
        return build_model(name, num_classes=data.num_classes, **sizes[name])
    return build_model(name) if ":" in name else build_model(name, num_classes=data.num_classes)


def _rng_state() -> dict:
    return {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class _SkippedStep(Exception):
    """A gradient of a variance-reduced step overflowed, or its loss is not finite."""

    def __init__(self, loss: float):
        super().__init__(loss)
        self.loss = loss


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class Trainer:
    """A training run. ``fit()`` trains to ``config.epochs`` and returns the summary.

    Args:
        config: the run.
        progress: show a progress bar per epoch (tqdm).
    """

    def __init__(self, config: TrainConfig, *, progress: bool = True):
        config.check()
        self.config = config
        policy = load_policy(config.policy)
        self.data = load_dataset(config.data, config.data_dir)
        _seed_everything(config.seed)
        self.device = torch.device(config.device)
        self.parallel = DataParallel.from_env(self.device)  # None: one process
        if self.parallel is not None:
            self.device = self.parallel.device
        self.progress = progress and (self.parallel is None or self.parallel.leader)
        self.model = model_for(config.model, self.data).to(self.device)
        example = self.data.batch("train", torch.arange(min(8, self.data.size("train"))))[0].to(self.device)
        tr = policy.trust_region
        self.compiled: CompiledModel = compile(self.model, policy, (example,), calibration=self._calibration(policy),
                                               level=config.level)
        self.scaler: LossScaler = make_loss_scaler(self._loss_scale(policy))
        self.optimizer, self.controller, self.objective = None, None, None
        self.optimizer_kind = optimizer_kind(config.optimizer, policy.optimizer)
        self._grad_format = policy.optimizer.gradient
        # the optimizer keeps the weights as codes between steps: checkpoints hold those, not the fp32 values
        self._packs_weights = policy.optimizer.storage == "packed" and policy.optimizer.master is not None
        self.steps_per_epoch = steps_per_epoch = num_batches(self.data, "train", config.batch_size)
        self.monitor_settings = self._monitor_settings(policy)
        self.monitor: Monitor | None = None
        if self.parallel is not None:
            self._check_parallel(policy)
            if config.fsdp is not None:  # before the optimizer: FSDP2 replaces the parameters by shards
                self.parallel.shard(self.compiled, config.fsdp)
        elif config.fsdp is not None:
            raise MpcompileError(f"--fsdp {config.fsdp} shards the model over the ranks of a data-parallel run, and "
                                 f"this run has one process: add --nproc N (N >= 2) or launch it with torchrun")
        if tr is None:
            self.optimizer = make_optimizer(self.optimizer_kind, self.compiled.parameters(), config.lr,
                                            policy.optimizer, seed=config.seed, steps_per_epoch=steps_per_epoch,
                                            full_grad=self._full_gradient, module=self.compiled)
        elif self.optimizer_kind != "sgd":
            raise MpcompileError(f"policy {policy.name} trains with its trust_region controller, which takes the steps "
                                 f"itself; optimizer {self.optimizer_kind} would not be used: drop it")
        elif policy.optimizer.storage == "packed":
            raise MpcompileError(f"policy {policy.name} trains with its trust_region controller, which keeps no packed "
                                 f"storage (it restores the weights exactly on a rejected step); drop optimizer.storage")
        else:
            self.objective = ModelObjective(self.compiled, self.model, F.cross_entropy, self.scaler, tr,
                                            policy.optimizer, seed=config.seed)
            self.controller = TrustRegion(self.objective, tr, lr=config.lr, on_check=self._on_check,
                                          steps_per_epoch=steps_per_epoch)
        self.train_module: nn.Module = self.compiled  # what the training steps call (DDP's wrapper, distributed)
        if self.parallel is not None and not self.parallel.sharded:
            self.train_module = self.parallel.wrap(self.compiled, policy.communication, config.seed)
        elif self.parallel is None and policy.communication is not None:
            warnings.warn(f"mpcompile: policy {policy.name}'s communication section ({policy.communication.format}) is "
                          f"read by data-parallel runs only (--nproc N or torchrun); this run has one process and "
                          f"sends no gradients", stacklevel=2)
        self.out = Path(config.out)
        self.epoch, self.step_in_epoch, self.history, self.nan_loss_steps = 0, 0, [], 0
        self.level_iterations: dict[str, int] = {}
        self._partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self._metrics = None

    def _check_parallel(self, policy) -> None:
        """Refuse what data-parallel training does not do (yet), rather than train it wrongly."""
        o = policy.optimizer
        if self.config.fsdp is not None and policy.communication is not None:
            raise MpcompileError(f"policy {policy.name}'s communication section ({policy.communication.format}) sets the "
                                 f"format of DDP's gradient all-reduce; under --fsdp FSDP2 reduce-scatters the gradients "
                                 f"in fp32: drop the section, or train with DDP (without --fsdp)")
        refused = [("a trust_region section (its checks and recompiles are per process)",
                    policy.trust_region is not None),
                   (f"optimizer {self.optimizer_kind} (its full gradients would need their own all-reduce)",
                    self.optimizer_kind in VARIANCE_REDUCED),
                   ("monitoring (its hooks read one process's numbers)", self.monitor_settings is not None),
                   ("optimizer.storage: packed with a master format (DDP holds the weights' storage)",
                    o.storage == "packed" and o.master is not None)]
        for what, present in refused:
            if present:
                raise MpcompileError(f"data-parallel training ({self.parallel.world} ranks) does not support {what}; "
                                     f"train it in one process")

    def _monitor_settings(self, policy) -> MonitorSettings | None:
        """The policy's ``monitor:`` section, ``every`` replaced by ``config.monitor`` (which
        turns monitoring on with the defaults where the policy has no section)."""
        settings = policy.monitor
        if self.config.monitor is not None:
            settings = dataclasses.replace(settings or MonitorSettings(), every=self.config.monitor)
        if settings is not None and (policy.trust_region is not None or self.optimizer_kind in VARIANCE_REDUCED):
            taker = "the trust_region controller" if policy.trust_region is not None else self.optimizer_kind
            raise MpcompileError(f"monitoring records plain training steps, and {taker} takes its steps itself: "
                                 f"it is not monitored; drop --monitor and the policy's monitor section")
        return settings

    def _calibration(self, policy) -> list[torch.Tensor]:
        """The first ``calibration_batches`` training batches (in the data's order) where anything
        reads what calibration measures: kappa rules or recompute, the trust region's ``bound``
        or ``per_layer``, or ``stats``; none otherwise (the condition and stats passes cost a pass
        each, and again at each recompile that changes formats)."""
        tr = policy.trust_region
        if not (policy.wants_calibration or self.config.stats
                or (tr is not None and (tr.epsilon == "bound" or tr.per_layer))):
            return []
        size, n = self.config.batch_size, self.data.size("train")
        starts = range(0, min(n, self.config.calibration_batches * size), size)
        return [self.data.batch("train", torch.arange(i, min(i + size, n)))[0].to(self.device) for i in starts]

    def _loss_scale(self, policy):
        spec = self.config.loss_scale
        if spec is None:
            rounds_grads = policy.optimizer.gradient is not None or any(
                s.quant is not None for a in self.compiled.assignments().values() for r, s in a.roles
                if r.startswith("grad"))
            return "dynamic" if rounds_grads else None
        return None if spec == "none" else spec

    # -- checkpoints --------------------------------------------------------------------------
    def _weight_names(self) -> set[str]:
        """The model's state keys that a checkpoint leaves to the optimizer's packed codes."""
        if not self._packs_weights:
            return set()
        return {name for name, _ in self.compiled.named_parameters(remove_duplicate=False)}

    def state_dict(self) -> dict[str, Any]:
        """The run's state; distributed, on every rank (it gathers each rank's communication state)."""
        comm = None
        if self.parallel is not None and self.parallel.hook is not None:
            comm = self.parallel.gather(self.parallel.hook.state_dict())
        graph = self.compiled.graph_state_dict()  # amax histories: each rank's, of its own activations
        if self.parallel is not None:
            graph = self.parallel.gather(graph)
        packed = self._weight_names()
        model = full_tensors({k: v for k, v in self.compiled.state_dict().items() if k not in packed})
        return {"config": dataclasses.asdict(self.config), "model": model, "graph": graph,
                "optimizer": full_tensors(self.optimizer.state_dict()) if self.optimizer else None,
                "controller": self.controller.state_dict() if self.controller else None,
                "objective": self.objective.state_dict() if self.objective else None,
                "kappa": self.compiled.condition_estimates(),  # measured at the last calibration
                "level_iterations": dict(self.level_iterations), "scaler": self.scaler.state_dict(),
                "level": self.compiled.level, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "partial": dict(self._partial), "history": list(self.history), "nan_loss_steps": self.nan_loss_steps,
                "rng": _rng_state(), "comm": comm}

    def save(self) -> Path:
        """Write checkpoint.pt (distributed: every rank takes part, rank 0 writes)."""
        path = self.out / "checkpoint.pt"
        state = self.state_dict()
        if self.parallel is not None and not self.parallel.leader:
            return path
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # a crash mid-write leaves the previous checkpoint whole
        return path

    @classmethod
    def resume(cls, path: str | Path, *, epochs: int | None = None, out: str | None = None,
               progress: bool = True) -> "Trainer":
        """The run saved at ``path`` (a checkpoint or its run folder), to go on training."""
        path = Path(path)
        path = path / "checkpoint.pt" if path.is_dir() else path
        if not path.is_file():
            raise MpcompileError(f"--resume {path}: no checkpoint there; give a run folder or its checkpoint.pt")
        state = torch.load(path, weights_only=False, map_location="cpu")
        config = TrainConfig(**state["config"])
        config.epochs = config.epochs if epochs is None else epochs
        config.out = config.out if out is None else out
        config.level = state["level"]
        trainer = cls(config, progress=progress)
        saved_ranks = len(state["graph"]) if isinstance(state.get("graph"), list) else 1
        ranks = 1 if trainer.parallel is None else trainer.parallel.world
        if "graph" in state and saved_ranks != ranks:  # each rank's histories, residuals and streams are its own
            raise MpcompileError(f"--resume {path}: the run was saved by {saved_ranks} rank(s) and this one has "
                                 f"{ranks}; resume it with --nproc {saved_ranks}")
        packed = trainer._weight_names()
        live = trainer.compiled.state_dict()  # FSDP2's: shards, which take their part of the saved whole tensors
        model = {k: shard_like(v, live[k]) if k in live else v for k, v in state["model"].items()}
        missing, unexpected = trainer.compiled.load_state_dict(model, strict=not packed)
        if set(missing) - packed or unexpected:
            raise MpcompileError(f"--resume {path}: the checkpoint's model state does not fit the model (missing "
                                 f"{sorted(set(missing) - packed)}, unexpected {sorted(unexpected)})")
        if state.get("kappa") is not None:
            trainer.compiled.load_condition_estimates(state["kappa"])
        if "graph" in state:
            graph = state["graph"] if trainer.parallel is None else state["graph"][trainer.parallel.rank]
            trainer.compiled.load_graph_state_dict(graph)
        if trainer.optimizer:
            trainer.optimizer.load_state_dict(state["optimizer"])
        else:
            trainer.controller.load_state_dict(state["controller"])
            trainer.objective.load_state_dict(state["objective"])
        trainer.level_iterations = state["level_iterations"]
        trainer.scaler.load_state_dict(state["scaler"])
        trainer.epoch, trainer.step_in_epoch = state["epoch"], state["step_in_epoch"]
        trainer._partial, trainer.history = state["partial"], state["history"]
        trainer.nan_loss_steps = state["nan_loss_steps"]
        if trainer.parallel is not None and trainer.parallel.hook is not None and state.get("comm"):
            trainer.parallel.hook.load_state_dict(state["comm"][trainer.parallel.rank])
        _set_rng_state(state["rng"])
        return trainer

    # -- training -----------------------------------------------------------------------------
    def evaluate(self, split: str = "test") -> float:
        """Accuracy (a fraction) on ``split``."""
        correct = 0
        was_training = self.compiled.training
        self.compiled.eval()
        with torch.no_grad():
            for x, y in batches(self.data, split, 256, shuffle=False, seed=0, epoch=0):
                correct += int((self.compiled(x.to(self.device)).argmax(1).cpu() == y).sum())
        self.compiled.train(was_training)
        return correct / self.data.size(split)

    def _set_lr(self, step: int, steps: int) -> None:
        lr = self.config.lr
        if self.config.schedule == "cosine":
            lr *= (1 + math.cos(math.pi * step / max(steps, 1))) / 2
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        else:
            self.controller.lr = lr

    def _on_check(self, check) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps({"epoch": self.epoch + 1, **check_record(check),  # recompile time so far
                                            "recompile_seconds": self.objective.recompile_seconds}) + "\n")

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, bool]:
        if self.controller is not None:
            loss, skipped = self.controller.step((x, y))
            level = self.objective.level  # the level the step was taken at (a raise happens before it)
            self.level_iterations[level] = self.level_iterations.get(level, 0) + 1
            self.nan_loss_steps = self.objective.nan_loss_steps
            return loss, 0 if skipped else self.objective.last_correct, skipped
        if self.optimizer_kind in VARIANCE_REDUCED:
            return self._variance_reduced_step(x, y)
        self.optimizer.zero_grad()
        step = self.epoch * self.steps_per_epoch + self.step_in_epoch  # over the run, from 0
        monitored = self.monitor is not None and self.monitor.due(step)
        if self.parallel is not None:
            return self._parallel_step(x, y)
        with self.monitor.step(step, self.epoch + 1) if monitored else contextlib.nullcontext():
            logits = self.monitor.forward(x) if monitored else self.compiled(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):  # the forward overflowed: no gradient to scale, so the scale stays
                self.nan_loss_steps += 1
                return float(loss.detach()), 0, True
            skipped = self.scaler.backward(loss, self.compiled.parameters(), self._grad_format)
            if not skipped:
                self.optimizer.step()
        return float(loss.detach()), int((logits.argmax(1) == y).sum()), skipped

    def _parallel_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, bool]:
        """One step of this rank on its share of the global batch; the loss and the correct
        count returned are the global batch's, so every rank records what one process would."""
        local_x, local_y, weight = self.parallel.share(x, y)
        if self.parallel.sharded:
            self.parallel.broadcast_buffers(self.compiled)
        logits = self.train_module(local_x)
        mean = F.cross_entropy(logits, local_y) if len(local_y) else logits.sum() * 0.0
        loss_sum, correct, finite = self.parallel.total(float(mean.detach()) * len(local_y),
                                                        float((logits.argmax(1) == local_y).sum()),
                                                        float(torch.isfinite(mean)))
        if finite < self.parallel.world:  # every rank skips together, or the others would wait in the all-reduce
            self.nan_loss_steps += 1
            return loss_sum / len(y), 0, True
        skipped = self.scaler.backward(mean * weight, self.compiled.parameters(), self._grad_format)
        if not skipped:
            self.optimizer.step()
        return loss_sum / len(y), int(correct), skipped

    def _variance_reduced_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, bool]:
        """SVRG / LP-SVRG / HALP: the optimizer calls the closure at w, then at the anchor; a
        gradient that overflows (the loss scaler skips it) or a non-finite loss in either call
        abandons the step."""
        logits = []

        def closure() -> torch.Tensor:
            out = self.compiled(x)
            loss = F.cross_entropy(out, y)
            self._scaled_backward(loss)
            logits.append(out.detach())
            return loss.detach()

        try:
            loss = self.optimizer.step(closure)
        except _SkippedStep as skip:
            return skip.loss, 0, True
        return float(loss), int((logits[0].argmax(1) == y).sum()), False

    def _scaled_backward(self, loss: torch.Tensor, *, unscale: bool = True) -> None:
        if not torch.isfinite(loss):
            self.nan_loss_steps += 1
            raise _SkippedStep(float(loss.detach()))
        self.scaler.scale(loss).backward()
        if unscale:
            self._unscale(float(loss.detach()))

    def _unscale(self, loss: float) -> None:
        skipped = self.scaler.unscale_(self.compiled.parameters(), self._grad_format)
        self.scaler.update(skipped)
        if skipped:
            raise _SkippedStep(loss)

    def _full_gradient(self) -> None:
        """The mean loss's gradient over the whole training set, left in ``.grad`` (the variance-
        reduced optimizers' ``full_grad``): batches of 256 in a fixed order, in train mode,
        scaled like any step's."""
        n, total = self.data.size("train"), 0.0
        for x, y in batches(self.data, "train", 256, shuffle=False, seed=0, epoch=0):
            loss = F.cross_entropy(self.compiled(x.to(self.device)), y.to(self.device)) * (len(y) / n)
            self._scaled_backward(loss, unscale=False)
            total += float(loss.detach())
        self._unscale(total)

    def fit(self) -> dict[str, Any]:
        """Train from where the run stands to ``config.epochs``; write metrics, plots, summary
        (distributed: rank 0 writes, every rank returns the summary)."""
        leader = self.parallel is None or self.parallel.leader
        if leader:
            self.out.mkdir(parents=True, exist_ok=True)
        metrics = ((self.out / "metrics.jsonl").open("a" if self.epoch or self.step_in_epoch else "w") if leader
                   else open(os.devnull, "w"))
        self._metrics = metrics
        if self.monitor_settings is not None:
            self.monitor = Monitor(self.compiled, self.monitor_settings, self.out,
                                   append=bool(self.epoch or self.step_in_epoch))
            if not (self.out / "memory.json").exists():  # the report's memory table: one step of a copy
                report = memory_report(self.compiled, self.config.batch_size, optimizer=self.optimizer_kind)
                (self.out / "memory.json").write_text(report.to_json() + "\n")
        try:
            while self.epoch < self.config.epochs:
                self._epoch(metrics)
        except KeyboardInterrupt:
            if self.parallel is not None:  # the other ranks are being stopped: no collective can gather their state
                raise MpcompileError(f"interrupted in epoch {self.epoch + 1}; the last checkpoint is that of epoch "
                                     f"{self.epoch}: go on with --resume {self.out}") from None
            path = self.save()
            raise MpcompileError(f"interrupted in epoch {self.epoch + 1}: saved {path}; go on with --resume {path}")
        finally:
            metrics.close()
            self._metrics = None
            if self.monitor is not None:
                self.monitor.close()
                self.monitor = None
        summary = self.summary()
        if not leader:
            return summary
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "table.txt").write_text(self.compiled.table() + "\n")
        self.plot()
        return summary

    def _epoch(self, metrics) -> None:
        from tqdm import tqdm

        c = self.config
        total = num_batches(self.data, "train", c.batch_size)
        order = batches(self.data, "train", c.batch_size, shuffle=True, seed=c.seed, epoch=self.epoch)
        bar = tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{c.epochs}",
                   disable=not self.progress, leave=True, dynamic_ncols=True)
        self.compiled.train()
        p = self._partial
        for i, (x, y) in enumerate(order):
            if i < self.step_in_epoch:
                continue  # resumed mid-epoch: these batches were trained on
            start = time.perf_counter()
            self._set_lr(self.epoch * total + i, c.epochs * total)
            loss, correct, skipped = self._train_step(x.to(self.device), y.to(self.device))
            p["seconds"] += time.perf_counter() - start
            if not skipped:  # an overflowed step's loss may be inf/NaN; it is counted as an overflow instead
                p["loss"] += loss * len(y)
                p["correct"] += correct
                p["seen"] += len(y)
            self.step_in_epoch = i + 1
            record = {"epoch": self.epoch + 1, "step": i + 1, "loss": loss, "skipped": skipped,
                      "loss_scale": self.scaler.scale_value}
            traffic = self.parallel.traffic() if self.parallel is not None else None
            if traffic is not None:  # one rank's gradient bytes this step: sent, at the format's bits, in fp32
                record.update(comm_bytes_sent=traffic.sent, comm_bytes_nominal=traffic.nominal,
                              comm_bytes_fp32=traffic.fp32)
            postfix = {}
            if self.controller is not None:
                record.update(level=self.objective.level, level_index=self.objective.level_index,
                              delta=self.controller.delta)
                postfix = {"level": self.objective.level, "delta": f"{self.controller.delta:.3g}"}
            metrics.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{p['loss'] / max(p['seen'], 1):.4f}", acc=f"{p['correct'] / max(p['seen'], 1):.3f}",
                            scale=f"{self.scaler.scale_value:g}", overflows=self.scaler.overflow_steps,
                            nan_loss=self.nan_loss_steps, **postfix)
        bar.close()
        record = {"epoch": self.epoch + 1, "train_loss": p["loss"] / p["seen"] if p["seen"] else math.nan,
                  "train_accuracy": p["correct"] / p["seen"] if p["seen"] else math.nan,
                  "test_accuracy": self.evaluate("test"),
                  "seconds": p["seconds"], "loss_scale": self.scaler.scale_value,
                  "overflow_steps": self.scaler.overflow_steps, "nan_loss_steps": self.nan_loss_steps,
                  "level": self.compiled.level, **self._swa_record()}
        self.history.append(record)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self._partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self.save()

    def _swa_record(self) -> dict[str, Any]:
        """SWALP's averaged model, its batch norms recomputed on the training data: its test
        accuracy and how many iterates it averages (nothing before averaging starts)."""
        if not isinstance(self.optimizer, SWALP) or not self.optimizer.averaged_count:
            return {}
        train = batches(self.data, "train", 256, shuffle=False, seed=0, epoch=0)
        with self.optimizer.averaged(self.compiled, train):
            accuracy = self.evaluate("test")
        return {"swa_test_accuracy": accuracy, "swa_averaged": self.optimizer.averaged_count}

    def summary(self) -> dict[str, Any]:
        c, last = self.config, (self.history[-1] if self.history else {})
        return {"model": c.model, "data": c.data, "policy": c.policy, "level": self.compiled.level,
                "epochs": len(self.history), "seed": c.seed, "optimizer": self.optimizer_kind, "lr": c.lr,
                "batch_size": c.batch_size, "test_accuracy": last["test_accuracy"] if last else self.evaluate("test"),
                "train_loss": last.get("train_loss", math.nan),
                "seconds_per_epoch": float(np.mean([h["seconds"] for h in self.history])) if self.history else 0.0,
                "overflow_steps": self.scaler.overflow_steps, "nan_loss_steps": self.nan_loss_steps,
                "ranks": self.parallel.world if self.parallel is not None else 1,
                **({"fsdp": c.fsdp} if self.parallel is not None and self.parallel.sharded else {}),
                **{k: last[k] for k in ("swa_test_accuracy", "swa_averaged") if k in last}, **self._dynamic_summary()}

    def _dynamic_summary(self) -> dict[str, Any]:
        if self.controller is None:
            return {}
        return {"levels": dict(self.level_iterations), "recompiles": self.objective.recompiles,
                "recompile_seconds": self.objective.recompile_seconds, "checks": self.controller.checks_made,
                "unmet_checks": self.controller.unmet, "final_delta": self.controller.delta}

    def plot(self) -> Path | None:
        """``curves.png``: train loss, and train / test accuracy, against epochs."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [h["epoch"] for h in self.history]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax_loss.plot(epochs, [h["train_loss"] for h in self.history], marker="o")
        ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log")
        ax_acc.plot(epochs, [h["train_accuracy"] for h in self.history], marker="o", label="train")
        ax_acc.plot(epochs, [h["test_accuracy"] for h in self.history], marker="o", label="test")
        ax_acc.set(xlabel="epoch", ylabel="accuracy")
        ax_acc.legend()
        fig.suptitle(f"{self.config.model} on {self.config.data}, policy {self.config.policy}")
        fig.tight_layout()
        path = self.out / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        if self.controller is not None:
            self._plot_trust_region(plt)
        return path

    def _plot_trust_region(self, plt) -> Path:
        """``trust_region.png``: loss, Delta and the level against iterations (from metrics.jsonl)."""
        steps = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in steps if "step" in m]
        it = range(1, len(steps) + 1)
        fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
        axes[0].plot(it, [m["loss"] for m in steps], lw=0.8)
        axes[0].set(ylabel="train loss", yscale="log")
        axes[1].plot(it, [m["delta"] for m in steps], lw=0.8)
        axes[1].set(ylabel="Delta", yscale="log")
        names = [lv.name for lv in self.compiled.policy.levels] or ["level 0"]
        axes[2].step(it, [m["level_index"] for m in steps], where="post")
        axes[2].set(ylabel="level", xlabel="iteration", yticks=range(len(names)), yticklabels=names)
        fig.suptitle(f"{self.config.model} on {self.config.data}, policy {self.config.policy}: trust region")
        fig.tight_layout()
        path = self.out / "trust_region.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def train(config: TrainConfig | None = None, *, progress: bool = True, **kwargs) -> dict[str, Any]:
    """Run ``config`` (or a ``TrainConfig(**kwargs)``) and return its summary."""
    return Trainer(config or TrainConfig(**kwargs), progress=progress).fit()
