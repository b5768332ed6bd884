"""counter_bits against a pure-Python lowbias32, and the statistics stochastic rounding needs."""
import torch

from mpcompile import quantize, set_quantize_kernel
from mpcompile.random_bits import counter_bits, mix32

M32 = 0xFFFFFFFF


def lowbias32(v: int) -> int:
    """Wellons' lowbias32 on Python ints (exact 32-bit arithmetic)."""
    v ^= v >> 16
    v = (v * 0x7FEB352D) & M32
    v ^= v >> 15
    v = (v * 0x846CA68B) & M32
    return v ^ (v >> 16)


def test_mix32_equals_python_reference():
    g = torch.Generator().manual_seed(0)
    words = torch.cat([torch.tensor([0, 1, M32, 2**31, 2**31 - 1]),
                       torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64)])
    kept = words.clone()
    assert mix32(words).tolist() == [lowbias32(w) for w in kept.tolist()]
    assert torch.equal(words, kept)  # mix32 works in place only on its own temporaries


def test_eager_words_equal_the_torch_formula_and_are_the_callers_to_change():
    for n in (1, 650, 1 << 16):  # the cached mix(i) of small tensors, up to one chunk
        for seed in (torch.tensor(0), torch.tensor(M32)):
            expected = mix32(mix32(torch.arange(n)) ^ seed)
            got = counter_bits(seed, torch.Size([n]))
            assert got.dtype == torch.int64 and torch.equal(got, expected)
            got.zero_()
            assert torch.equal(counter_bits(seed, torch.Size([n])), expected)


def test_counter_bits_equals_python_reference_and_keeps_shape():
    seed = torch.tensor(0xDEADBEEF)
    got = counter_bits(seed, torch.Size([3, 5, 7]))
    assert got.shape == (3, 5, 7)
    assert got.flatten().tolist() == [lowbias32(lowbias32(i) ^ 0xDEADBEEF) for i in range(105)]


def test_chunked_eager_bits_equal_the_formula():
    n = (1 << 17) + 5  # more than one eager chunk, with a tail
    seed = torch.tensor(12345)
    chunked = counter_bits(seed, torch.Size([n]))
    whole = mix32(mix32(torch.arange(n) & M32) ^ seed)
    assert torch.equal(chunked, whole)


def test_bits_are_uniform_and_seeds_independent():
    n = 1 << 18
    a, b = counter_bits(torch.tensor(1), torch.Size([n])), counter_bits(torch.tensor(2), torch.Size([n]))
    ones = torch.stack([(a >> k) & 1 for k in range(32)]).double().mean(1)
    # each bit is Bernoulli(1/2): the mean of n draws is within 5 standard errors (5 * 0.5/sqrt(n))
    assert ((ones - 0.5).abs() < 5 * 0.5 / n**0.5).all(), ones
    agree = ((a ^ b) & 1).double().mean()
    assert abs(agree - 0.5) < 5 * 0.5 / n**0.5


def test_seeded_stochastic_rounding_is_the_same_with_both_kernels_and_reproducible():
    x = torch.randn(4099)
    run = lambda: quantize(x, "fp8_e5m2", "stochastic", generator=torch.Generator().manual_seed(7))
    try:
        set_quantize_kernel("reference")
        ref = run()
        set_quantize_kernel("fused")
        fused = run()
    finally:
        set_quantize_kernel(None)
    assert torch.equal(ref, fused) and torch.equal(ref, run())
    torch.manual_seed(3)
    first = quantize(x, "fp8_e5m2", "stochastic")
    torch.manual_seed(3)
    assert torch.equal(first, quantize(x, "fp8_e5m2", "stochastic"))
    assert not torch.equal(first, quantize(x, "fp8_e5m2", "stochastic"))  # the generator moved on
