"""llama.cpp's K-quants (issue 21): qsweep's port of the reference quantizer (``quantize_row_qN_K_ref``, what
``llama-quantize`` runs without an importance matrix) equals llama.cpp's own, in the library llama-cpp-python
builds: every dequantized value and every stored byte, on tensors with all-zero super-blocks and sub-blocks,
outliers, one-signed and tiny rows, flat runs and exact ties; rows that are not a multiple of 256 are stored as
``llama-quantize`` stores them."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch
from conftest import needs_extra

from qsweep import kquants
from qsweep.export.runtime import llama_cpp_missing
from qsweep.formats import get_format

needs_llama = needs_extra(llama_cpp_missing())
LEGACY = {"q8_0": (32, 34), "q5_1": (32, 24), "q5_0": (32, 22), "q4_0": (32, 18)}  # values, bytes per block


def ggml(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's ``quantize_row_<kind>_ref`` and ``dequantize_row_<kind>`` on ``x`` (rows of whole blocks): the
    stored bytes per block and the dequantized values."""
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    values, size = LEGACY.get(kind) or (kquants.QK_K, kquants.BLOCK_BYTES[kind])
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    raw = np.zeros(x.size // values * size, dtype=np.uint8)
    out = np.zeros(x.size, dtype=np.float32)
    for name, args in ((f"quantize_row_{kind}_ref", (x, raw)), (f"dequantize_row_{kind}", (raw, out))):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn(args[0].ctypes.data, args[1].ctypes.data, x.size)
    return raw.reshape(-1, size), out


def hard(seed: int, cols: int = 1024) -> np.ndarray:
    """[16, cols] fp32: one distribution per seed, and every edge case of the block quantizers in the first rows."""
    rng = np.random.default_rng(seed)
    x = [rng.standard_normal((16, cols)), rng.standard_normal((16, cols)) ** 3,
         rng.standard_t(2, (16, cols)) * 0.02, rng.integers(-3, 4, (16, cols)) * 0.5,
         rng.standard_normal((16, cols)) * np.exp(2 * rng.standard_normal((16, 1)))][seed].astype(np.float32)  # fmt: skip
    x[0, :256] = 0  # an all-zero super-block
    x[1, :16], x[1, 48:80] = 0, 0  # zero sub-blocks (of 16 and of 32)
    x[2, 5], x[2, 300] = 40.0, -1e4  # outliers
    x[3], x[4] = np.abs(x[3]), -np.abs(x[4])  # one sign
    x[5, :256] = 1e-20  # below GROUP_MAX_EPS
    x[6] *= 1e-3
    x[7, 100:140] = 3.0  # flat sub-blocks
    return x


@needs_llama
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", kquants.KQUANTS)
def test_k_quants_are_llama_cpps_values_and_bytes(kind, seed):
    x = hard(seed)
    raw, values = ggml(x, kind)
    fields = kquants.quantize(torch.from_numpy(x).reshape(-1, kquants.QK_K), kind)
    assert np.array_equal(kquants.pack(fields, kind), raw)
    ours = kquants.fake_quant(torch.from_numpy(x), kind).numpy().reshape(-1)
    assert np.array_equal(ours, values)
    assert np.array_equal(kquants.dequantize(fields, kind).numpy().reshape(-1), values)
    # the registered format is the same quantizer on [out, in] rows, and prices the bytes llama.cpp stores
    fmt = get_format(kind)
    assert torch.equal(fmt.fake_quant(torch.from_numpy(x), 0), torch.from_numpy(values.reshape(x.shape)))
    assert fmt.packed_bytes(x.shape, 0) == raw.nbytes


@needs_llama
@pytest.mark.parametrize("kind", kquants.KQUANTS)
def test_rows_not_a_multiple_of_256_are_stored_as_llama_quantize_stores_them(kind):
    """llama-quantize falls back (tensor_type_fallback in llama-quant.cpp): q6_K -> q8_0, q5_K -> q5_1, q4_K -> q5_0,
    q3_K and q2_K -> q4_0; rows not a multiple of the fallback's 32 -> F16 (the recipe slow test in test_export.py
    checks llama-quantize itself). A [n, 384] weight (GPT-2's 768 / 2, the
    bundled model's 128-wide rows the same way)."""
    fallback = kquants.FALLBACK[kind]
    fmt = get_format(kind)
    x = hard(0, cols=384)
    raw, values = ggml(x, fallback)
    assert fmt.storage(x.shape, 0) == fallback.upper()
    assert np.array_equal(fmt.fake_quant(torch.from_numpy(x), 0).numpy(), values.reshape(x.shape))
    assert fmt.packed_bytes(x.shape, 0) == raw.nbytes
    assert fmt.storage((16, 300), 0) == "F16" and fmt.packed_bytes((16, 300), 0) == 16 * 300 * 2
    assert fmt.storage((300,), None) == "F32"


def test_k_quant_sizes_and_layout_without_llama_cpp():
    """What needs no runtime: bits per weight as llama.cpp states them (Q2_K 2.625 ... Q6_K 6.5625), the packed
    layout's size, and a super-block's dequantized values on its codes' grid."""
    bpw = {"q2_K": 2.625, "q3_K": 3.4375, "q4_K": 4.5, "q5_K": 5.5, "q6_K": 6.5625}
    x = torch.from_numpy(hard(0))
    for kind in kquants.KQUANTS:
        assert 8 * kquants.BLOCK_BYTES[kind] / kquants.QK_K == bpw[kind]
        fields = kquants.quantize(x.reshape(-1, kquants.QK_K), kind)
        assert kquants.pack(fields, kind).shape == (x.numel() // kquants.QK_K, kquants.BLOCK_BYTES[kind])
        y = kquants.fake_quant(x, kind)
        assert torch.equal(y[0, :256], torch.zeros(256))  # an all-zero super-block stays zero
        err = (y - x)[8:].abs().mean() / x[8:].abs().mean()
        assert err < {"q2_K": 0.45, "q3_K": 0.25, "q4_K": 0.12, "q5_K": 0.06, "q6_K": 0.03}[kind], (kind, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", kquants.KQUANTS)
def test_k_quants_on_a_gpu_are_the_cpus_bit_for_bit(kind):
    """A search on a GPU simulates llama.cpp's bytes too: every constant is a tensor on the data's device (CUDA turns
    a division by a CPU scalar into a multiplication by its reciprocal)."""
    for seed in range(5):
        x = torch.from_numpy(hard(seed, cols=3072))
        cpu = kquants.quantize(x.reshape(-1, kquants.QK_K), kind)
        gpu = kquants.quantize(x.cuda().reshape(-1, kquants.QK_K), kind)
        assert np.array_equal(kquants.pack(gpu, kind), kquants.pack(cpu, kind)), (kind, seed)
        assert torch.equal(kquants.fake_quant(x.cuda(), kind).cpu(), kquants.fake_quant(x, kind)), (
            kind,
            seed,
        )
