"""Every registered format goes through the same contract: error bounds per bit width, sizes, known answers."""

from __future__ import annotations

import itertools

import pytest
import torch

from qsweep.formats import FORMATS, FloatFormat, IntFormat, get_format, register_format

ALL = sorted(FORMATS)
INTS = [n for n in ALL if isinstance(FORMATS[n], IntFormat)]
# (shape, channel_dim): GPT-2 Conv1D [in, out], nn.Linear [out, in], an embedding, a bias / LayerNorm vector.
SHAPES = [((256, 384), 1), ((384, 256), 0), ((1000, 128), 0), ((768,), None)]


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[7] = 0.3  # an outlier, as GPT-2 has
    return w


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("shape", "cdim"), SHAPES)
def test_fake_quant_keeps_shape_dtype_and_is_idempotent(name, shape, cdim):
    fmt = get_format(name)
    w = _weights(shape)
    q = fmt.fake_quant(w, cdim)
    assert q.shape == w.shape and q.dtype == torch.float32
    assert torch.isfinite(q).all()
    # quantizing an already-quantized tensor changes nothing (codes are exact on the grid)
    torch.testing.assert_close(fmt.fake_quant(q, cdim), q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", INTS)
@pytest.mark.parametrize(("shape", "cdim"), SHAPES)
def test_int_error_is_at_most_half_a_step(name, shape, cdim):
    """Round-to-nearest with scale = max|w| / qmax: no element moves more than half a step of the whole tensor."""
    fmt = FORMATS[name]
    w = _weights(shape)
    err = (fmt.fake_quant(w, cdim) - w).abs().max().item()
    assert err <= w.abs().max().item() / fmt.qmax / 2 * (1 + 1e-5)


@pytest.mark.parametrize(("name", "rel"), [("fp32", 0.0), ("fp16", 2**-11), ("bf16", 2**-8)])
def test_float_error_bounded_by_mantissa(name, rel):
    w = _weights((256, 384))
    err = (get_format(name).fake_quant(w) - w).abs()
    assert (err <= w.abs() * rel + 2**-25).all()  # fp16 subnormals: absolute step 2**-24


def test_fp32_is_bit_identical():
    w = _weights((64, 64))
    assert torch.equal(get_format("fp32").fake_quant(w), w)


@pytest.mark.parametrize("gran", ["", "_channel", "_g128", "_g32"])
def test_more_bits_less_error(gran):
    w = _weights((256, 384))
    names = [f"int{b}{gran}" for b in (8, 4, 3, 2) if f"int{b}{gran}" in FORMATS]
    errs = [(FORMATS[n].fake_quant(w, 1) - w).pow(2).mean().item() for n in names]
    assert errs == sorted(errs), dict(zip(names, errs, strict=True))


@pytest.mark.parametrize(("shape", "cdim"), [*SHAPES[:3], ((3072,), None)])
def test_fewer_bits_never_cost_more_bytes(shape, cdim):
    """On realistic tensor shapes, a format with fewer bits is never more expensive, in either accounting."""
    numel = torch.Size(shape).numel()
    for a, b in itertools.permutations(ALL, 2):
        fa, fb = FORMATS[a], FORMATS[b]
        if fa.bits < fb.bits:
            assert fa.seed_bytes(numel) <= fb.seed_bytes(numel), (a, b)
            assert fa.packed_bytes(shape, cdim) <= fb.packed_bytes(shape, cdim), (a, b)


def test_seed_int8_per_tensor_known_answer():
    w = torch.tensor([[0.1, -0.254], [0.0333, 0.2]])
    # scale = 0.254 / 127 = 0.002; codes 50, -127, 16.65 -> 17, 100
    expected = torch.tensor([[50, -127], [17, 100]], dtype=torch.float32) * (0.254 / 127)
    torch.testing.assert_close(get_format("int8").fake_quant(w), expected, rtol=0, atol=1e-7)


def test_seed_int4_flat_groups_of_128_known_answer():
    # Two groups of 128 consecutive values in memory order, crossing rows of a [4, 64] tensor.
    flat = torch.zeros(256)
    flat[0], flat[1], flat[2], flat[127] = 7.0, 2.4, -3.4, 0.6  # group 0: max 7 -> scale 1
    flat[128], flat[129], flat[255] = -1.4, 0.25, 0.7  # group 1: max 1.4 -> scale 0.2
    q = get_format("int4").fake_quant(flat.reshape(4, 64)).reshape(-1)
    expected = torch.zeros(256)
    expected[0], expected[1], expected[2], expected[127] = 7.0, 2.0, -3.0, 1.0
    expected[128], expected[129], expected[255] = -1.4, 0.2, 0.8  # codes -7, 1 (1.25 -> 1), 4 (3.5 -> 4)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-6)


def test_channel_scales_follow_conv1d_output_dim():
    """Conv1D stores [in, out]: each column (output channel) gets its own scale."""
    w = torch.tensor([[1.0, 0.01], [0.5, 0.003]])  # column 1 is tiny: per-tensor int8 would zero 0.003
    s0, s1 = 1.0 / 127, 0.01 / 127
    expected = torch.tensor(
        [[127 * s0, 127 * s1], [64 * s0, 38 * s1]]
    )  # 63.5 -> 64 (half to even), 38.1 -> 38
    per_channel = get_format("int8_channel").fake_quant(w, channel_dim=1)
    torch.testing.assert_close(per_channel, expected, rtol=0, atol=1e-7)
    per_tensor = get_format("int8").fake_quant(w)
    assert per_tensor[1, 1].item() == 0.0  # 0.003 / (1 / 127) = 0.38 -> 0


def test_group_scales_run_along_input_dim():
    """int4_g32 on a Linear [out, in]: each output row split into groups of 32 along the input dimension."""
    w = torch.ones(2, 64)
    w[0, :32] *= 100.0  # a large group must not affect its neighbours
    q = get_format("int4_g32").fake_quant(w, channel_dim=0)
    torch.testing.assert_close(q, w)
    flat = get_format("int4").fake_quant(w)  # flattened groups of 128 mix both: the ones round to 100/7 steps
    assert not torch.allclose(flat, w)


def test_packed_bytes_count_scales():
    shape, cdim = (768, 2304), 1  # GPT-2 c_attn
    numel = 768 * 2304
    assert get_format("fp16").packed_bytes(shape, cdim) == 2 * numel
    assert get_format("int8").packed_bytes(shape, cdim) == numel + 2
    assert get_format("int8_channel").packed_bytes(shape, cdim) == numel + 2 * 2304
    assert get_format("int4").packed_bytes(shape, cdim) == numel // 2 + 2 * numel // 128
    assert get_format("int4_g128").packed_bytes(shape, cdim) == numel // 2 + 2 * 2304 * 6
    assert get_format("int3_g128").packed_bytes(shape, cdim) == numel * 3 // 8 + 2 * 2304 * 6
    assert get_format("int4").seed_bytes(numel) == numel // 2


def test_ragged_groups_are_padded_not_dropped():
    w = torch.randn(3, 100)  # 300 values: groups of 128, 128, 44
    q = get_format("int4").fake_quant(w)
    assert (q - w).abs().max() <= w.abs().max() / 7 / 2 + 1e-6
    assert get_format("int4").packed_bytes((3, 100)) == 150 + 2 * 3
    assert get_format("int4_g32").packed_bytes((3, 100), 0) == 150 + 2 * 3 * 4


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown format 'int5'.*valid formats: fp32, fp16, bf16, int8"):
        get_format("int5")
    with pytest.raises(ValueError, match=r"did you mean.*fp16"):
        get_format("fp61")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_format(FloatFormat("fp16", 16, torch.float16))
