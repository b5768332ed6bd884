"""Optimizers for low-precision training.

- ``low_precision``: ``LowPrecisionOptimizer``, torch's optimizers with formats for what they store (LP-SGD);
- ``svrg``: ``SVRG`` and ``LPSVRG``, variance reduced by an anchor's full gradient;
- ``halp``: ``HALP``, SVRG with bit centering: a low-precision offset on a grid that refines;
- ``swalp``: ``SWALP``, the fp32 average of low-precision iterates;
- ``full_gradient``: the full gradient from a closure or a data loader;
- ``codebook_states`` / ``packed_weights``: states and weights kept as codes between steps;
- ``codebook_adam``: Adam stepping codebook moments in place, by the fused CPU kernel;
- ``make``: the optimizer a policy's ``optimizer:`` section asks for.
"""
from .full_gradient import full_gradient
from .halp import HALP
from .low_precision import LowPrecisionOptimizer, StoredRounding
from .make import OPTIMIZERS, VARIANCE_REDUCED, make_optimizer, optimizer_kind
from .packed_weights import unpack_parameters
from .svrg import LPSVRG, SVRG, VarianceReduced
from .swalp import SWALP

__all__ = ["LowPrecisionOptimizer", "StoredRounding", "VarianceReduced", "SVRG", "LPSVRG", "HALP", "SWALP",
           "full_gradient", "make_optimizer", "optimizer_kind", "OPTIMIZERS", "VARIANCE_REDUCED",
           "unpack_parameters"]
