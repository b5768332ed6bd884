"""Weights held as codes of their ``master`` format between optimizer steps.

With ``optimizer: {master: <format>, storage: packed}`` the optimizer encodes each parameter
after its step (``formats.encode``: a byte an element for 8-bit formats) and frees the
parameter's storage, resizing it to 0 bytes, as FSDP frees its unsharded parameters. The
parameter objects stay the same (autograd, the optimizer's state and the compiled graph keep
referring to them); ``unpack`` reallocates each storage and decodes the codes into it, bit for
bit the weights the step left. Hooks on the modules that own the parameters unpack them before
a forward, a ``state_dict`` and a ``load_state_dict``; anything else that reads the parameters
between steps (a node-by-node interpreter, a deep copy, ``named_parameters``) must call
``unpack_parameters(module)`` first. Reading a freed parameter raises an error that says so
(torch's storage access guard, the one inductor's CUDA graphs set on freed outputs), rather than
reading freed memory.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ...errors import MpcompileError
from ...formats import Packed, decode, encode

__all__ = ["PackedWeights", "unpack_parameters"]

_HELD: "weakref.WeakKeyDictionary[nn.Module, PackedWeights]" = weakref.WeakKeyDictionary()


def unpack_parameters(module: nn.Module) -> None:
    """Decode the weights an optimizer keeps packed for ``module`` (the module it was given),
    if any, so that they can be read outside its forward."""
    if module in _HELD:
        _HELD[module].unpack()


class PackedWeights:
    """Parameters kept as codes of ``fmt`` while packed.

    Args:
        params: the parameters (contiguous, each the sole owner of its storage).
        fmt: their master format, of at most 16 bits.
        module: the module whose forward reads them: it and each submodule owning one of them
            get hooks that unpack before a forward, a state_dict or a load_state_dict.

    Raises:
        MpcompileError: a parameter that shares its storage or is not contiguous (freeing the
            storage would free other tensors' values).
    """

    def __init__(self, params: list[nn.Parameter], fmt, module: nn.Module):
        for p in params:
            if not p.is_contiguous() or p.storage_offset() or p.untyped_storage().nbytes() != p.nbytes:
                name = next((n for n, q in module.named_parameters() if q is p), "a parameter")
                raise MpcompileError(f"optimizer.storage: packed frees each weight's storage between steps, but {name} "
                                     f"shares its storage or is not contiguous; use storage: emulated")
        self.params, self.fmt = params, fmt
        names = {id(q): n for n, q in module.named_parameters()}
        self._freed_messages = [
            f"{names.get(id(p), 'a parameter')} is held as codes of {fmt} between optimizer steps (optimizer.storage: "
            f"packed) and its storage is freed: call mpcompile.runtime.optim.unpack_parameters(model) before reading "
            f"it outside the model's forward / state_dict" for p in params]
        self.codes: dict[int, Packed] = {}  # parameter index -> its codes, while packed
        ids = {id(p) for p in params}
        owners = {id(m): m for m in module.modules() if any(id(p) in ids for p in m.parameters(recurse=False))}
        self._handles = [handle for m in {id(module): module, **owners}.values() for handle in (
            m.register_forward_pre_hook(lambda *_: self.unpack()),
            m.register_state_dict_pre_hook(lambda *_: self.unpack()),
            m.register_load_state_dict_pre_hook(lambda *_: self.unpack()))]
        _HELD[module] = self

    @property
    def packed(self) -> bool:
        return bool(self.codes)

    @torch.no_grad()
    def pack(self) -> None:
        """Encode every parameter (each a value of ``fmt``) and free its storage."""
        for i, p in enumerate(self.params):
            if i not in self.codes:
                self.codes[i] = encode(p, self.fmt)
                p.untyped_storage().resize_(0)
                torch._C._set_storage_data_ptr_access_error_msg(p.untyped_storage()._cdata, self._freed_messages[i])

    @torch.no_grad()
    def unpack(self) -> None:
        """Give each packed parameter its storage back, holding the decoded weights."""
        for i, packed in self.codes.items():
            p = self.params[i]
            torch._C._clear_storage_data_ptr_access_error_msg(p.untyped_storage()._cdata)
            p.untyped_storage().resize_(p.nbytes)
            p.copy_(decode(packed, self.fmt, p.shape, p.dtype))
        self.codes = {}

    def load(self, codes: dict[int, Packed]) -> None:
        """Decode ``codes`` (a checkpoint's) into the parameters, leaving them unpacked."""
        self.unpack()
        self.codes = {i: Packed(c.codes.to(self.params[i].device),
                                None if c.scales is None else c.scales.to(self.params[i].device))
                      for i, c in codes.items()}
        self.unpack()

    @property
    def nbytes(self) -> int:
        """Bytes of the codes (0 while unpacked)."""
        return sum(c.nbytes for c in self.codes.values())

    def remove(self) -> None:
        """Unpack, and take the hooks off the modules."""
        self.unpack()
        for handle in self._handles:
            handle.remove()
        self._handles = []
