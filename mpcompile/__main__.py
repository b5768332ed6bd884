"""``python -m mpcompile ...`` and ``torchrun -m mpcompile train ...``: the ``mpcompile`` command."""
import sys

from torch.distributed.elastic.multiprocessing.errors import record  # a rank's exception reaches its launcher

from .cli import main

sys.exit(record(main)())
