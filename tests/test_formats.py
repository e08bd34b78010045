"""Every registered format goes through the same contract: exact per-group codes and fp16 scales for the integer
formats (checked against an independent grouping), error bounds per bit width, sizes, and known answers."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from qsweep.errors import ConfigError
from qsweep.formats import FORMATS, FloatFormat, IntFormat, KQuantFormat, get_format, register_format

ALL = sorted(FORMATS)
INTS = [n for n in ALL if isinstance(FORMATS[n], IntFormat)]
# (shape, channel_dim): GPT-2 Conv1D [in, out], nn.Linear [out, in], an embedding, a bias / LayerNorm vector, and
# ragged shapes whose last group (flat: 300 = 128 + 128 + 44; group: 100 = 3 x 32 + 4) is partial.
SHAPES = [((256, 384), 1), ((384, 256), 0), ((1000, 128), 0), ((768,), None), ((3, 100), 0), ((100, 3), 1)]


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[7] = 0.3  # an outlier, as GPT-2 has: a coarser scale than the format's would show
    return w


def _group_ids(fmt: IntFormat, shape: tuple[int, ...], cdim: int | None) -> torch.Tensor:
    """The group each element belongs to, ``shape`` int64, computed from indices (independently of formats.py)."""
    gran = fmt.granularity
    if len(shape) < 2 or cdim is None:
        gran = {"channel": "tensor", "group": "flat"}.get(gran, gran)
    numel = math.prod(shape)
    if gran == "tensor":
        return torch.zeros(shape, dtype=torch.long)
    if gran == "flat":  # memory order
        return torch.arange(numel).reshape(shape) // fmt.group_size
    idx = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    channel = idx[cdim]
    if gran == "channel":
        return channel
    pos = torch.zeros(shape, dtype=torch.long)  # position along the input: row-major over the other axes
    for d in range(len(shape)):
        if d != cdim:
            pos = pos * shape[d] + idx[d]
    per_channel = math.ceil(numel // shape[cdim] / fmt.group_size)
    return channel * per_channel + pos // fmt.group_size


def _check_int_contract(fmt: IntFormat, w: torch.Tensor, q: torch.Tensor, cdim: int | None) -> None:
    """Each group's values are integer codes times that group's own fp16-rounded scale max|w|/qmax, the codes span
    the signed range up to qmax in every group, and round-to-nearest bounds each group's error by its own step."""
    gid = _group_ids(fmt, tuple(w.shape), cdim).reshape(-1)
    wf, qf = w.reshape(-1), q.reshape(-1)
    n = int(gid.max()) + 1
    amax = torch.zeros(n).scatter_reduce(0, gid, wf.abs(), "amax")
    s32 = amax / fmt.qmax
    s16 = s32.half().float()
    assert (s16 > 0).all(), "test weights must keep every scale inside fp16's range"
    codes = qf / s16[gid]
    assert torch.equal(codes, codes.round()), "values are not integer multiples of their group's fp16 scale"
    assert codes.min() >= -(2 ** (fmt.bits - 1)) and codes.max() <= fmt.qmax
    top = torch.zeros(n).scatter_reduce(0, gid, codes.abs(), "amax")
    assert (top == fmt.qmax).all(), "a group's largest value does not reach qmax: its scale is not its own"
    bound = s32[gid] / 2 * (1 + 1e-4) + codes.abs() * (s16 - s32).abs()[gid]
    assert ((wf - qf).abs() <= bound).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("shape", "cdim"), SHAPES)
def test_fake_quant_keeps_shape_dtype_and_is_idempotent(name, shape, cdim):
    fmt = get_format(name)
    w = _weights(shape)
    q = fmt.fake_quant(w, cdim)
    assert q.shape == w.shape and q.dtype == torch.float32
    # quantizing an already-quantized tensor changes nothing (values are exact on their grid); not llama.cpp's
    # K-quants, whose reference quantizer searches its scales (and mins) afresh and may pick other ones
    if not isinstance(fmt, KQuantFormat) or fmt.storage(shape, cdim) != fmt.ggml_type:
        assert torch.equal(fmt.fake_quant(q, cdim), q)


@pytest.mark.parametrize("name", INTS)
@pytest.mark.parametrize(("shape", "cdim"), SHAPES)
def test_int_formats_meet_the_per_group_contract(name, shape, cdim):
    fmt = FORMATS[name]
    w = _weights(shape)
    _check_int_contract(fmt, w, fmt.fake_quant(w, cdim), cdim)


def test_contract_rejects_a_coarser_scale_and_fp32_scales():
    """The contract above fails for the defects it is there to catch."""
    fmt = FORMATS["int4_g32"]
    w = _weights((384, 256))
    per_tensor = IntFormat("per_tensor_int4", 4, "tensor").fake_quant(w)  # a group format falling back
    with pytest.raises(AssertionError):
        _check_int_contract(fmt, w, per_tensor, 0)
    rows = w.reshape(-1, 32)  # [out, in] with groups of 32 along the input: consecutive in memory
    scale = rows.abs().amax(1, keepdim=True) / 7
    fp32_scaled = (torch.round(rows / scale).clamp(-8, 7) * scale).reshape(w.shape)  # unrounded scales
    with pytest.raises(AssertionError):
        _check_int_contract(fmt, w, fp32_scaled, 0)


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


@pytest.mark.parametrize(("shape", "cdim"), SHAPES)
def test_fewer_bits_fewer_packed_bytes_at_equal_granularity(shape, cdim):
    families = defaultdict(list)
    for fmt in FORMATS.values():
        if isinstance(fmt, IntFormat):
            families[(fmt.granularity, fmt.group_size)].append(fmt)
    families = [f for f in families.values() if len(f) > 1]
    assert len(families) >= 5  # channel, flat 128, group 128 / 64 / 32
    for fmts in families:
        fmts.sort(key=lambda f: -f.bits)
        sizes = [f.packed_bytes(shape, cdim) for f in fmts]
        assert all(a > b for a, b in itertools.pairwise(sizes)), {
            f.name: s for f, s in zip(fmts, sizes, strict=True)
        }
    floats = [get_format(n).packed_bytes(shape, cdim) for n in ("fp32", "fp16")]
    assert floats[0] == 2 * floats[1]


@pytest.mark.parametrize(("shape", "cdim"), [*SHAPES[:3], ((3072,), None)])
def test_fewer_bits_never_cost_more_bytes(shape, cdim):
    """On realistic tensor shapes, a format with fewer bits is never more expensive, in either accounting."""
    numel = torch.Size(shape).numel()
    # GGUF formats keep 1-D tensors F32 (what llama.cpp stores and runs), whatever their block bits
    names = [n for n in ALL if len(shape) > 1 or not hasattr(FORMATS[n], "ggml_type")]
    # a K-quant on rows not a multiple of 256 is stored as llama-quantize's fallback (q2_K: q4_0), not at its bits
    names = [n for n in names if not isinstance(FORMATS[n], KQuantFormat) or FORMATS[n].storage(shape, cdim)
             == FORMATS[n].ggml_type]  # fmt: skip
    for a, b in itertools.permutations(names, 2):
        fa, fb = FORMATS[a], FORMATS[b]
        if fa.bits < fb.bits:
            assert fa.seed_bytes(numel) <= fb.seed_bytes(numel), (a, b)
            assert fa.packed_bytes(shape, cdim) <= fb.packed_bytes(shape, cdim), (a, b)


def _fp16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).half().item()


def test_seed_int8_per_tensor_known_answer():
    w = torch.tensor([[0.1, -0.254], [0.0333, 0.2]])
    # scale = 0.254 / 127 = 0.002, stored as fp16 0.0020008...; codes 50, -127, 16.65 -> 17, 100
    expected = torch.tensor([[50, -127], [17, 100]], dtype=torch.float32) * _fp16(0.254 / 127)
    assert torch.equal(get_format("int8").fake_quant(w), expected)


def test_seed_int4_flat_groups_of_128_known_answer():
    # Two groups of 128 consecutive values in memory order, crossing rows of a [4, 64] tensor.
    flat = torch.zeros(256)
    flat[0], flat[1], flat[2], flat[127] = 7.0, 2.4, -3.4, 0.6  # group 0: max 7 -> scale 1 (exact in fp16)
    flat[128], flat[129], flat[255] = -1.4, 0.25, 0.7  # group 1: max 1.4 -> scale 0.2, stored 0.19995...
    q = get_format("int4").fake_quant(flat.reshape(4, 64)).reshape(-1)
    expected = torch.zeros(256)
    expected[0], expected[1], expected[2], expected[127] = 7.0, 2.0, -3.0, 1.0
    expected[128], expected[129], expected[255] = (torch.tensor([-7.0, 1.0, 4.0]) * _fp16(1.4 / 7)).tolist()
    assert torch.equal(q, expected)


def test_ties_round_away_from_zero_like_c_roundf():
    """ggml rounds codes with roundf (half away from zero); torch.round would give 2, -2, 0, -0, 2."""
    q = get_format("int4").fake_quant(torch.tensor([7.0, 2.5, -2.5, 0.5, -0.5, 1.5]))
    assert q.tolist() == [7.0, 3.0, -3.0, 1.0, -1.0, 2.0]


def _q8_0_reference(w: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref then dequantize, per block of 32 (fp32 arithmetic, roundf in float64)."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    x = (blocks * inv).astype(np.float64)  # fp32 products, exactly representable in float64
    codes = np.sign(x) * np.floor(np.abs(x) + 0.5)
    return (codes.astype(np.float32) * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def test_int8_g32_is_ggml_q8_0_bit_for_bit():
    """A weight laid out [out, in] in int8_g32 is Q8_0: same codes, same fp16 scales, same dequantized values."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 128, generator=g) * torch.logspace(-5, 1, 256).unsqueeze(1)  # subnormal scales too
    w[0, :32] = torch.arange(
        -15.5, 16.0
    )  # exact ties: with max|w| = 127 the scale is 1 and codes are k + 0.5
    w[0, 0] = 127.0
    w[1, :32] = 1e-9  # a scale that underflows fp16: both store zeros
    ours = get_format("int8_g32").fake_quant(w, channel_dim=0).numpy()
    assert np.array_equal(ours, _q8_0_reference(w.numpy()))


def test_scales_outside_fp16_range_are_guarded():
    int8 = get_format("int8")
    # underflow: max|w| / 127 rounds to fp16 zero -> the group is stored as zeros, not NaN
    assert int8.fake_quant(torch.tensor([1e-9, -5e-10])).abs().sum().item() == 0.0
    # overflow: the scale saturates at fp16's max (65504) and the largest values clip at 127 * 65504
    q = int8.fake_quant(torch.tensor([1e7, 1.0, -3e6]))
    assert q.tolist() == [127 * 65504.0, 0.0, -46 * 65504.0]
    # subnormal fp16 scales are kept (as ggml keeps them): values are codes times the subnormal scale
    w = torch.tensor([1e-4, 3e-5, -7e-5])
    assert torch.equal(int8.fake_quant(w), torch.tensor([127.0, 38.0, -89.0]) * _fp16(1e-4 / 127))


def test_channel_scales_follow_conv1d_output_dim():
    """Conv1D stores [in, out]: each column (output channel) gets its own scale."""
    w = torch.tensor([[1.0, 0.01], [0.25, 0.003]])  # column 1 is tiny: per-tensor int8 would zero 0.003
    codes = torch.tensor([[127.0, 127.0], [32.0, 38.0]])  # 31.75 -> 32, 38.1 -> 38
    expected = codes * torch.tensor([_fp16(1.0 / 127), _fp16(0.01 / 127)])
    assert torch.equal(get_format("int8_channel").fake_quant(w, channel_dim=1), expected)
    assert get_format("int8").fake_quant(w)[1, 1].item() == 0.0  # 0.003 / (1 / 127) = 0.38 -> 0


def test_group_scales_run_along_input_dim():
    """int4_g32 on a Linear [out, in]: each output row split into groups of 32 along the input dimension."""
    w = torch.ones(2, 64)
    w[0, :32] *= 100.0  # a large group must not affect its neighbours
    q = get_format("int4_g32").fake_quant(w, channel_dim=0)
    assert torch.equal(q[0, :32], torch.full((32,), 7 * _fp16(100 / 7)))
    assert torch.equal(q[:, 32:], torch.full((2, 32), 7 * _fp16(1 / 7)))
    assert torch.equal(q[1, :32], q[1, 32:])
    flat = get_format("int4").fake_quant(
        w
    )  # flattened groups of 128 mix both: the ones round to 0 steps of 100/7
    assert flat[0, 32:].abs().sum().item() == 0.0


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
    """300 values: flat groups of 128, 128, 44 (3 scales); per row of 100: groups of 32, 32, 32, 4 (4 scales)."""
    assert get_format("int4").packed_bytes((3, 100)) == 150 + 2 * 3
    assert get_format("int4_g32").packed_bytes((3, 100), 0) == 150 + 2 * 3 * 4
    w = torch.zeros(3, 100)
    w[2, 56:] = 1.0  # the 44-value tail group (flat indices 256..299) alone
    w[0, 0] = 70.0
    q = get_format("int4").fake_quant(w)
    assert torch.equal(q[2, 56:], torch.full((44,), 7 * _fp16(1 / 7)))  # its own scale, not group 0's


def test_unknown_format_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown format 'int5'.*valid formats: fp32, fp16, bf16, int8"):
        get_format("int5")
    with pytest.raises(ConfigError, match=r"did you mean .*fp16"):
        get_format("fp61")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_format(FloatFormat("fp16", 16, torch.float16))


@pytest.mark.parametrize("name", [n for n in ALL if not isinstance(FORMATS[n], FloatFormat)])
@pytest.mark.parametrize(
    ("shape", "cdim"), [((1000, 128), 0), ((384, 256), 0), ((256, 384), 1), ((3, 100), 0)]
)
def test_block_wise_quantization_and_16_bit_inputs_give_the_same_bits(name, shape, cdim, monkeypatch):
    """Large tensors are quantized a block of rows at a time, widening a 16-bit pristine tensor block by block
    (memory: one block's temporaries): the result is bit-identical to the whole tensor widened to fp32 at once."""
    import qsweep.formats as formats

    fmt = get_format(name)
    w = _weights(shape).to(torch.bfloat16)
    whole = fmt.fake_quant(w.float(), cdim)
    monkeypatch.setattr(formats, "QUANT_BLOCK_ELEMENTS", 200)  # many blocks, a ragged last one
    blocked = fmt.fake_quant(w, cdim)
    assert blocked.dtype == torch.float32 and torch.equal(blocked, whole)


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_float_formats_of_a_16_bit_input_round_once_from_its_exact_value(name):
    w = _weights((64, 64)).to(torch.bfloat16)
    assert torch.equal(get_format(name).fake_quant(w, 0), get_format(name).fake_quant(w.float(), 0))
