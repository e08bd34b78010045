"""Precision formats: how a weight tensor is stored, simulated in fp32 ("fake quantization").

Each format is a small frozen dataclass registered under a unique name. A format knows
  * how to fake-quantize a tensor (quantize, then dequantize back to fp32), and
  * what storing a tensor costs, in two accountings:
      - ``seed_bytes``: the seed project's convention, numel x bits / 8, no scales;
      - ``packed_bytes``: the real cost, low-bit codes packed densely plus the scales at their stored dtype.

Integer formats are symmetric (no zero point) with ``qmax = 2**(bits-1) - 1`` and codes in ``[-2**(bits-1), qmax]``
(the seed's INT8 has qmax 127, its INT4 qmax 7). The model simulated is the model priced: scales are stored as fp16
(``IntFormat.scale_bytes = 2``), so they are rounded to fp16 before dequantizing. The arithmetic follows ggml's
reference quantizers (``quantize_row_q8_0_ref``, gguf-py's ``Q8_0``) bit for bit, so that a later GGUF export of
the same codes and scales reproduces exactly the weights that were evaluated (``int8_g32`` on a ``[out, in]``
weight *is* Q8_0). Per group of values ``w`` (all fp32)::

    d     = max|w| / qmax                          # fp32 scale
    codes = clamp(roundf(w * (1 / d)))             # reciprocal, then round half away from zero (C roundf)
    w'    = codes * fp16(d)                        # dequantized with the stored (fp16) scale

The fp16 range is guarded: a scale above fp16's largest finite value (65504, i.e. ``max|w| > 65504 * qmax``, never
seen in trained LMs) is saturated to 65504 before the codes are computed, so the group clips instead of
dequantizing to inf; a scale that underflows to fp16 zero (``max|w| < qmax * 2**-25``) stores an all-zero group
(error below that bound). Scales in fp16's subnormal range (``d < 2**-14``) are kept, as ggml keeps them, with their
coarser precision. So every dequantized value is exactly ``code * stored_scale``.

Granularities (where the scale is shared):
  * ``tensor``:  one scale for the whole tensor (the seed's INT8);
  * ``channel``: one scale per output channel (``channel_dim`` of the parameter: dim 1 for GPT-2's Conv1D
    ``[in, out]``, dim 0 for ``nn.Linear`` ``[out, in]`` and embeddings);
  * ``flat``:    the tensor flattened in memory order, groups of ``group_size`` consecutive values (the seed's INT4);
  * ``group``:   per output channel, groups of ``group_size`` along the input dimension (GPTQ/AWQ style).
1-D tensors (biases, LayerNorm) have no channel axis: ``channel`` falls back to ``tensor`` and ``group`` to ``flat``.
A ragged last group is padded with zeros, which changes neither its max nor its codes.

GGUF-native formats (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``: :class:`GGUFFormat`) are ggml's legacy block
types, simulated as gguf-py's own quantize-then-dequantize (``gguf.quants``, bit-exact with ggml's reference
quantizers), so a search over them searches exactly what a GGUF file deploys. Per block of 32 values along a row
of the ``[out, in]`` weight (fp32 arithmetic, scales stored as fp16, quantized with the fp32 scale)::

    q8_0:         d = max|w| / 127;      codes = roundf(w / d)                     w' = fp16(d) * codes
    q4_0 / q5_0:  d = w[argmax|w|] / -n; codes = clamp(trunc(w / d + n + 0.5))     w' = fp16(d) * (codes - n)
    q4_1 / q5_1:  d = (max - min) / L;   codes = clamp(trunc((w - min) / d + 0.5)) w' = fp16(d) * codes + fp16(min)

(n = 8 / 16, L = 15 / 31; ``/ d`` is a product with the fp32 reciprocal, as in gguf-py.) What llama.cpp stores
elsewhere is what they simulate: 1-D tensors (biases, LayerNorms) stay F32, as llama.cpp's converter and quantizer
keep them and its CPU kernels require (a bias or norm is added/multiplied as F32); a 2-D tensor whose rows are not
a multiple of 32 falls back to F16, as ``llama-quantize`` does. Their packed size is the GGUF tensor data: 34 / 18 /
20 / 22 / 24 bytes per block of 32, 4 bytes per F32 and 2 per F16 value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import qsweep.kquants as kquants
from qsweep.errors import ConfigError, did_you_mean

__all__ = [
    "FORMATS",
    "FloatFormat",
    "Format",
    "GGUFFormat",
    "IntFormat",
    "KQuantFormat",
    "get_format",
    "register_format",
]


@dataclass(frozen=True)
class Format:
    """Base class: a named storage precision."""

    name: str
    bits: int

    def fake_quant(self, w: torch.Tensor, channel_dim: int | None = None) -> torch.Tensor:
        """Return ``w`` stored in this format and read back, as fp32 with ``w``'s shape."""
        raise NotImplementedError

    def seed_bytes(self, numel: int) -> int:
        """Bytes under the seed's accounting: numel x bits / 8, scales not counted (rounded up per tensor)."""
        return math.ceil(numel * self.bits / 8)

    def packed_bytes(self, shape: tuple[int, ...], channel_dim: int | None = None) -> int:
        """Bytes actually needed to store a tensor of ``shape``: packed codes plus scales."""
        raise NotImplementedError


@dataclass(frozen=True)
class FloatFormat(Format):
    """An IEEE/bfloat storage dtype: round to ``dtype`` and back (fp32 is the identity)."""

    dtype: torch.dtype = torch.float32

    def fake_quant(self, w: torch.Tensor, channel_dim: int | None = None) -> torch.Tensor:
        if self.dtype == torch.float32:
            return w.to(torch.float32)
        return w.to(torch.float32).to(self.dtype).to(torch.float32)  # widened first: one rounding, any input

    def packed_bytes(self, shape: tuple[int, ...], channel_dim: int | None = None) -> int:
        return self.seed_bytes(math.prod(shape))


GRANULARITIES = ("tensor", "channel", "flat", "group")
_FP16_MAX = torch.finfo(torch.float16).max  # 65504.0


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exactly: ``floor(x + 0.5)`` would round 0.49999997 up in fp32. In place
    on one temporary: ``whole + floor(2 * (|x| - whole))`` with ``whole = floor(|x|)``, signed as ``x``."""
    a = x.abs()
    whole = a.floor()
    a.sub_(whole).mul_(2).floor_().add_(whole)
    del whole
    return a.copysign_(x)


# Elements quantized at a time: the temporaries of a quantization are those of one block (16 MiB in fp32), not of
# the whole tensor (an 8B model's lm_head holds 131M elements, 0.5 GiB per fp32 temporary).
QUANT_BLOCK_ELEMENTS = 2**22


def _by_rows(rows: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` (row-independent, ``[n, k] -> [n, k]`` fp32) applied to ``rows`` (any float dtype, widened to fp32 a
    block at a time) a block of at most QUANT_BLOCK_ELEMENTS elements at a time: the same values, with one block's
    temporaries."""
    n, k = rows.shape
    step = max(1, QUANT_BLOCK_ELEMENTS // max(k, 1))
    if n <= step:
        return fn(rows.float())
    out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    for i in range(0, n, step):
        out[i : i + step] = fn(rows[i : i + step].float())
    return out


@dataclass(frozen=True)
class IntFormat(Format):
    """Symmetric round-to-nearest integer quantization with shared scales (see module docstring)."""

    granularity: str = "tensor"
    group_size: int = 0
    scale_bytes: int = 2  # scales are stored as fp16 in the packed accounting

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if self.granularity in ("flat", "group") and self.group_size <= 0:
            raise ValueError(f"format {self.name!r}: granularity {self.granularity!r} needs group_size > 0")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"format {self.name!r}: bits must be in [2, 8], got {self.bits}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _effective(self, ndim: int, channel_dim: int | None) -> str:
        if self.granularity in ("channel", "group") and (ndim < 2 or channel_dim is None):
            return "tensor" if self.granularity == "channel" else "flat"
        return self.granularity

    def _quant_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Fake-quantize each row of a 2-D tensor ``[n_groups, group]`` with its own scale (module docstring), a
        block of rows at a time."""
        return _by_rows(rows, self._quant_block)

    def _quant_block(self, rows: torch.Tensor) -> torch.Tensor:
        codes, scale = self.quantize_rows(rows)
        return codes.mul_(scale)

    def quantize_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[n_groups, group]`` (integers held as fp32) and stored scales ``[n_groups, 1]`` (fp16 values
        held as fp32) of each row of ``rows`` ``[n_groups, group]``; ``codes * scales`` is the fake-quantized row."""
        amax = rows.abs().amax(dim=1, keepdim=True)
        # Divisions by tensors, not Python numbers: CUDA turns ``t / 7`` into ``t * (1 / 7)``, which differs from
        # the IEEE quotient (and from the CPU and ggml) in the last bit.
        scale = (amax / torch.full_like(amax, self.qmax)).clamp_(
            max=_FP16_MAX
        )  # fp32, saturated to fp16's max
        stored = scale.to(torch.float16).to(torch.float32)
        inv = torch.where(
            stored > 0, torch.ones_like(scale) / scale, torch.zeros_like(scale)
        )  # underflow: codes 0
        codes = _roundf(rows * inv).clamp_(-self.qmax - 1, self.qmax)
        return codes, stored

    def fake_quant(self, w: torch.Tensor, channel_dim: int | None = None) -> torch.Tensor:
        # w may be 16-bit: rows are widened to fp32 a block at a time (_by_rows), the result is fp32
        gran = self._effective(w.ndim, channel_dim)
        if gran == "tensor":
            return self._quant_rows(w.float().reshape(1, -1)).reshape(w.shape)
        if gran == "flat":
            flat = w.reshape(-1)
            pad = (-flat.numel()) % self.group_size
            rows = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, self.group_size)
            return self._quant_rows(rows).reshape(-1)[: flat.numel()].reshape(w.shape)
        # channel / group: move the output channel to dim 0, the reduction axis is everything else
        moved = w.movedim(channel_dim, 0)
        rows = moved.reshape(moved.shape[0], -1)
        if gran == "channel":
            out = self._quant_rows(rows)
        else:
            n_out, n_in = rows.shape
            pad = (-n_in) % self.group_size
            grouped = (torch.nn.functional.pad(rows, (0, pad)) if pad else rows).reshape(-1, self.group_size)
            out = self._quant_rows(grouped).reshape(n_out, n_in + pad)[:, :n_in]
        return out.reshape(moved.shape).movedim(0, channel_dim).contiguous()

    def n_scales(self, shape: tuple[int, ...], channel_dim: int | None = None) -> int:
        """Number of scales stored for a tensor of ``shape``."""
        numel = math.prod(shape)
        gran = self._effective(len(shape), channel_dim)
        if gran == "tensor":
            return 1
        if gran == "flat":
            return math.ceil(numel / self.group_size)
        n_out = shape[channel_dim]
        if gran == "channel":
            return n_out
        return n_out * math.ceil(numel // n_out / self.group_size)

    def packed_bytes(self, shape: tuple[int, ...], channel_dim: int | None = None) -> int:
        return self.seed_bytes(math.prod(shape)) + self.n_scales(shape, channel_dim) * self.scale_bytes


GGUF_BLOCK = 32  # values per block of every ggml legacy type
_GGUF_SCHEMES = ("q8_0", "sym", "affine")


@dataclass(frozen=True)
class GGUFFormat(Format):
    """A ggml legacy block type (module docstring): ``scheme`` ``q8_0`` (absmax / 127, roundf), ``sym`` (Q4_0 /
    Q5_0: the signed extreme maps to code 0) or ``affine`` (Q4_1 / Q5_1: scale and minimum); ``block_bytes`` is
    ggml's type size (bytes per block of 32)."""

    scheme: str = "q8_0"
    block_bytes: int = 34

    def __post_init__(self) -> None:
        if self.scheme not in _GGUF_SCHEMES:
            raise ValueError(f"format {self.name!r}: scheme {self.scheme!r} is not one of {_GGUF_SCHEMES}")

    @property
    def ggml_type(self) -> str:
        """The ggml type name of the blocks (``Q4_0``), as in ``gguf.GGMLQuantizationType``."""
        return self.name.upper()

    def storage(self, shape: tuple[int, ...], channel_dim: int | None = None) -> str:
        """How GGUF stores a tensor of ``shape``: ``F32`` (1-D), ``F16`` (rows not a multiple of 32) or
        :attr:`ggml_type`. A row is everything but the output channel ``channel_dim``."""
        if len(shape) < 2 or channel_dim is None:
            return "F32"
        if (math.prod(shape) // shape[channel_dim]) % GGUF_BLOCK:
            return "F16"
        return self.ggml_type

    def quantize_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """gguf-py's quantizer on ``blocks`` ``[n, 32]`` fp32: stored codes ``[n, 32]`` (unsigned integers held as
        fp32; q8_0's are signed), the scale ``d`` ``[n, 1]`` and, for ``affine``, the minimum ``m`` ``[n, 1]``, both
        rounded to fp16 (the stored values, held as fp32)."""
        half = 2 ** (self.bits - 1)
        if self.scheme == "q8_0":
            amax = blocks.abs().amax(dim=1, keepdim=True)
            d = amax / torch.full_like(amax, 127)  # a tensor divisor: IEEE quotient on every device
            inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
            return _roundf(blocks * inv), d.half().float(), None
        if self.scheme == "sym":
            extreme = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # signed; first of ties
            d = extreme / torch.full_like(extreme, -half)
            inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
            codes = torch.trunc(blocks * inv + (half + 0.5)).clamp_(0, 2 * half - 1)
            return codes, d.half().float(), None
        lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
        d = (hi - lo) / torch.full_like(lo, 2 * half - 1)
        inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
        codes = torch.trunc((blocks - lo) * inv + 0.5).clamp_(0, 2 * half - 1)
        return codes, d.half().float(), lo.half().float()

    def dequantize_blocks(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """gguf-py's dequantizer: ``[n, 32]`` fp32 values from :meth:`quantize_blocks`' output."""
        if self.scheme == "q8_0":
            return d * codes
        if self.scheme == "sym":
            return d * (codes - 2 ** (self.bits - 1))
        return d * codes + m

    def fake_quant(self, w: torch.Tensor, channel_dim: int | None = None) -> torch.Tensor:
        kind = self.storage(tuple(w.shape), channel_dim)
        if kind == "F32":
            return w.to(torch.float32)
        if kind == "F16":
            return w.float().half().float()
        moved = w.movedim(channel_dim, 0)  # [out, ...]: GGUF's rows, blocks of 32 along each
        out = _by_rows(
            moved.reshape(-1, GGUF_BLOCK), lambda b: self.dequantize_blocks(*self.quantize_blocks(b))
        )
        return out.reshape(moved.shape).movedim(0, channel_dim).contiguous()

    def packed_bytes(self, shape: tuple[int, ...], channel_dim: int | None = None) -> int:
        kind, numel = self.storage(shape, channel_dim), math.prod(shape)
        if kind in ("F32", "F16"):
            return numel * (4 if kind == "F32" else 2)
        return numel // GGUF_BLOCK * self.block_bytes


@dataclass(frozen=True)
class KQuantFormat(Format):
    """A llama.cpp K-quant (Q2_K ... Q6_K; :mod:`qsweep.kquants`: its reference quantizer, bit for bit): super-blocks
    of 256 values along each row, ``block_bytes`` per super-block. As ``llama-quantize`` does, a tensor whose rows are
    not a multiple of 256 is stored in the type ``kquants.FALLBACK`` names (q8_0 for q6_K, q5_1 for q5_K, q5_0 for
    q4_K, q4_0 for q3_K and q2_K), and 1-D tensors F32."""

    block_bytes: int = 144

    @property
    def ggml_type(self) -> str:
        return self.name.upper()  # Q4_K, as in gguf.GGMLQuantizationType

    def fallback(self) -> Format:
        return FORMATS[kquants.FALLBACK[self.name]]

    def storage(self, shape: tuple[int, ...], channel_dim: int | None = None) -> str:
        """How GGUF stores a tensor of ``shape``: :attr:`ggml_type`, or what the fallback type stores."""
        if (
            len(shape) >= 2
            and channel_dim is not None
            and not (math.prod(shape) // shape[channel_dim]) % kquants.QK_K
        ):
            return self.ggml_type
        return self.fallback().storage(shape, channel_dim)

    def fake_quant(self, w: torch.Tensor, channel_dim: int | None = None) -> torch.Tensor:
        if self.storage(tuple(w.shape), channel_dim) != self.ggml_type:
            return self.fallback().fake_quant(w, channel_dim)
        moved = w.movedim(channel_dim, 0)  # [out, ...]: GGUF's rows, super-blocks of 256 along each
        out = _by_rows(moved.reshape(-1, kquants.QK_K), lambda b: kquants.fake_quant(b, self.name))
        return out.reshape(moved.shape).movedim(0, channel_dim).contiguous()

    def packed_bytes(self, shape: tuple[int, ...], channel_dim: int | None = None) -> int:
        if self.storage(shape, channel_dim) != self.ggml_type:
            return self.fallback().packed_bytes(shape, channel_dim)
        return math.prod(shape) // kquants.QK_K * self.block_bytes


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` to the registry; a name registered twice is an error."""
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """Look a format up by exact name; unknown names raise :class:`ConfigError` with the valid names."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown format {name!r}{did_you_mean(name, FORMATS)}; valid formats: {', '.join(FORMATS)}"
        ) from None


register_format(FloatFormat("fp32", 32, torch.float32))
register_format(FloatFormat("fp16", 16, torch.float16))
register_format(FloatFormat("bf16", 16, torch.bfloat16))
# The seed's definitions keep the short names: int8 is per-tensor, int4/int3/int2 are flattened groups of 128.
register_format(IntFormat("int8", 8, "tensor"))
register_format(IntFormat("int8_channel", 8, "channel"))
for _bits in (8, 4, 3, 2):
    if _bits != 8:
        register_format(IntFormat(f"int{_bits}", _bits, "flat", 128))
        register_format(IntFormat(f"int{_bits}_channel", _bits, "channel"))
    for _g in (128, 64, 32):
        register_format(IntFormat(f"int{_bits}_g{_g}", _bits, "group", _g))
del _bits, _g
# ggml's legacy block types (GGUF-native; see GGUFFormat): bits per code, scheme, bytes per block of 32
register_format(GGUFFormat("q8_0", 8, "q8_0", 34))
register_format(GGUFFormat("q4_0", 4, "sym", 18))
register_format(GGUFFormat("q4_1", 4, "affine", 20))
register_format(GGUFFormat("q5_0", 5, "sym", 22))
register_format(GGUFFormat("q5_1", 5, "affine", 24))
# llama.cpp's K-quants (KQuantFormat): bits per code, bytes per super-block of 256
for _name in kquants.KQUANTS:
    register_format(KQuantFormat(_name, int(_name[1]), kquants.BLOCK_BYTES[_name]))
del _name
