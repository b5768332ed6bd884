"""fits_dtype: whether a format's values (in the dtype's normal range) are values of a torch dtype,
checked against numpy's and ml_dtypes' own casts."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from mpcompile.formats import fits_dtype, parse

FORMATS = {"fp8_e4m3": (True, True), "fp8_e5m2": (True, True), "fp16": (False, True), "bf16": (True, True),
           "fixed(8,4)": (True, True), "fixed(16,8)": (False, False), "mxfp8_e4m3": (True, True),
           "e6m9": (False, True), "e3m2": (True, True)}
ORACLES = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fits_dtype_as_the_oracle_casts_the_formats_values(name, dtype):
    values = parse(name).values().double().numpy()
    tiny, top = float(ml_dtypes.finfo(ORACLES[dtype]).tiny), float(ml_dtypes.finfo(ORACLES[dtype]).max)
    values = values[np.isfinite(values) & (np.abs(values) <= top) & ((np.abs(values) >= tiny) | (values == 0))]
    oracle = bool((values.astype(ORACLES[dtype]).astype(np.float64) == values).all())
    assert fits_dtype(parse(name), dtype) is oracle is FORMATS[name][dtype == torch.float16]


def test_a_format_wider_than_16_bits_never_fits():
    assert not fits_dtype(parse("fp32"), torch.bfloat16)
