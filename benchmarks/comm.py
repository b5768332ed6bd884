"""Issue 26's bar for the communication hook: its cost on a 25 MB bucket against an fp32 all-reduce.

    .venv/bin/python benchmarks/comm.py [--repeats 7] [--mb 25]

Two gloo ranks on loopback (this machine), one DDP-sized bucket of --mb MB of fp32 gradients
(normal values, a different stream per rank) in one buffer kept for the run, as DDP keeps its
buckets (a fresh 25 MB tensor a call would time page faults). Timed on rank 0, each the median of --repeats
rounds after one warm-up, the variants taking turns in each round: torch's fp32 all-reduce of
the bucket (what DDP does without a hook), and ``quantized_allreduce_hook`` in each format
(quantize, pack, all-gather of codes and scales, unpack and average). Printed per format: the
time over the fp32 all-reduce's, and a rank's bytes sent per step (as sent, nominal, fp32).
Bar (issue 26): at most 1.5x of the fp32 all-reduce.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpcompile.formats import parse
from mpcompile.policy import CommunicationSettings
from mpcompile.runtime.distributed import QuantizedGradients, quantized_allreduce_hook

BAR = 1.5
VARIANTS = {
    "bf16": CommunicationSettings(format=parse("bf16")),
    "fp8_e5m2": CommunicationSettings(format=parse("fp8_e5m2")),
    "fp8_e5m2 + error feedback": CommunicationSettings(format=parse("fp8_e5m2"), error_feedback=True),
    "fp8_e4m3 block(32), shared scale": CommunicationSettings(format=parse("fp8_e4m3"), scaling="block", block_size=32,
                                                              shared_scale=True),
    "mxfp8_e5m2": CommunicationSettings(format=parse("mxfp8_e5m2"), scaling="none"),
}


class _Bucket:
    """What DDP hands a hook: a flat gradient buffer, its parameters, its index."""

    def __init__(self, buffer: torch.Tensor, param: torch.nn.Parameter):
        self._buffer, self._params = buffer, [param]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def index(self) -> int:
        return 0


def _rank(rank: int, init: str, numel: int, repeats: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    param = torch.nn.Parameter(torch.empty(numel))
    states = {name: QuantizedGradients(s, [param], seed=0) for name, s in VARIANTS.items()}

    bucket = torch.empty_like(grad)  # DDP's bucket is one buffer for the whole run: refilled, untimed, each round

    def fp32() -> None:
        dist.all_reduce(bucket)

    def hook(name: str):
        return lambda: quantized_allreduce_hook(states[name], _Bucket(bucket, param)).wait()

    runs = {"fp32 all-reduce": fp32, **{name: hook(name) for name in VARIANTS}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            bucket.copy_(grad)
            dist.barrier()
            start = time.perf_counter()
            run()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        traffic = {name: state.traffic.reset() for name, state in states.items()}
        torch.save({"times": times, "traffic": traffic, "rounds": repeats + 1}, out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mb", type=float, default=25.0)
    args = ap.parse_args()
    numel = int(args.mb * 2**20 / 4)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_rank, args=(f"file://{tmp}/store", numel, args.repeats, out), nprocs=2, join=True)
        result = torch.load(out, weights_only=False)
    base = statistics.median(result["times"]["fp32 all-reduce"])
    print(f"2 gloo ranks on loopback, a {args.mb:g} MB fp32 bucket ({numel} gradients), 1 thread a rank; "
          f"median of {args.repeats} rounds on rank 0")
    print(f"  {'variant':36s} {'ms':>9s} {'x fp32':>7s} {'sent/step':>11s} {'nominal':>11s} {'fp32':>11s}")
    print(f"  {'fp32 all-reduce':36s} {base * 1e3:9.1f} {1.0:7.2f} {4 * numel:11d} {4 * numel:11d} {4 * numel:11d}")
    for name in VARIANTS:
        t = statistics.median(result["times"][name])
        traffic = result["traffic"][name]
        rounds = result["rounds"]
        print(f"  {name:36s} {t * 1e3:9.1f} {t / base:7.2f} {traffic.sent // rounds:11d} "
              f"{traffic.nominal // rounds:11d} {traffic.fp32 // rounds:11d}   "
              f"bar {BAR}x: {'met' if t / base <= BAR else 'MISSED'}")


if __name__ == "__main__":
    main()
