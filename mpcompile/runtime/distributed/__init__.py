"""Data-parallel training on torch.distributed.

- ``comm_hook``: a DDP communication hook that sends gradients in the policy's ``communication`` format;
- ``data_parallel``: this process's rank, its share of each batch, the model under DDP;
- ``launch``: ``mpcompile train --nproc N``, through torch's elastic launcher (torchrun's).
"""
from .comm_hook import QuantizedGradients, Traffic, quantized_allreduce_hook
from .data_parallel import DataParallel

__all__ = ["QuantizedGradients", "Traffic", "quantized_allreduce_hook", "DataParallel"]
