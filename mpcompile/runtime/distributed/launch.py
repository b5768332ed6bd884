"""``mpcompile train --nproc N``: N processes on this machine through torch.distributed's elastic launcher.

The same launcher torchrun is: each process runs ``python -m mpcompile`` with the other
arguments and finds its rank in its environment; the rendezvous is on loopback. If a rank
fails, the launcher stops the others and the first failure (the failing rank's exception,
which ``mpcompile.__main__`` records for it) is raised here, on the process that launched them.
"""
from __future__ import annotations

import os
import sys
import uuid
import warnings

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from ...errors import MpcompileError

__all__ = ["launch"]


def launch(argv: list[str], nproc: int) -> None:
    """Run ``mpcompile`` with ``argv`` (``train ...``) in ``nproc`` processes, one rank each, and wait for them.

    Raises:
        MpcompileError: a bad process count, or a rank that failed (its error).
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or nproc < 1:
        raise MpcompileError(f"--nproc {nproc!r}: give a positive number of processes")
    cores = os.cpu_count() or 1
    if nproc > cores:
        warnings.warn(f"mpcompile: --nproc {nproc} processes on {cores} CPU cores: they will share cores and each "
                      f"step waits for the slowest", stacklevel=2)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "mpcompile", *argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()  # the root cause: the launcher stops the others after it
        message = failure.message.get("message") if isinstance(failure.message, dict) else None  # a recorded exception
        raise MpcompileError(f"rank {rank} of {nproc} failed: "
                             f"{message or f'exit code {failure.exitcode} (its error is above, on its stderr)'}") from None
