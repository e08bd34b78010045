"""ggml's K-quants (Q2_K ... Q6_K) as llama.cpp's reference quantizer makes them, without an importance matrix.

``quantize_row_qN_K_ref`` in ``ggml/src/ggml-quants.c`` (what ``llama-quantize`` runs when no imatrix is given)
ported to torch, vectorised across blocks and sequential where the C code is: every float32 operation is done in
the C code's order (no fused multiply-add: ggml-base, which holds these functions, is built without FMA
contraction), sums accumulate element by element, ``nearest_int`` is its own bit trick (``x + 1.5 * 2**23``), the
scales are stored as the C code stores them (6-bit codes, fp16 ``d``/``dmin``, int8 wrap-around included), and the
values are dequantized as ``dequantize_row_qN_K`` computes them. Tests compare :func:`fake_quant` with llama.cpp's
own quantize + dequantize (the library llama-cpp-python builds) bit for bit, and :func:`pack` with its bytes.

A super-block is 256 values (``QK_K``) of one row; rows whose length is not a multiple of 256 are not K-quantized
(:data:`FALLBACK` names what ``llama-quantize`` stores instead).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BLOCK_BYTES", "FALLBACK", "KQUANTS", "QK_K", "dequantize", "fake_quant", "pack", "quantize"]

QK_K = 256
KQUANTS = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K")
BLOCK_BYTES = {"q2_K": 84, "q3_K": 110, "q4_K": 144, "q5_K": 176, "q6_K": 210}  # ggml's type sizes
# llama-quantize's type for a tensor whose rows are not a multiple of 256 (tensor_type_fallback in llama-quant.cpp,
# llama-cpp-python 0.3.36's llama.cpp; older versions took IQ4_NL for Q2_K/Q3_K); then F16 if 32 does not divide
FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0"}
_EPS = 1e-15  # GROUP_MAX_EPS


def _f(v, like: torch.Tensor) -> torch.Tensor:
    """The float32 constant ``v`` (computed in float32 by numpy first, as the C expression is) as a tensor shaped and
    placed like ``like``: a true IEEE operand on every device (CUDA turns division by a CPU scalar into
    multiplication by its reciprocal, which rounds differently)."""
    return torch.full_like(like, np.float32(v), dtype=torch.float32)


def _nearest(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: the bits of ``v + 12582912.f``, as int32 (round half to even for |v| < 2**22)."""
    bits = (v + _f(12582912.0, v)).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis one element at a time, in float32 (the C loops' order)."""
    s = torch.zeros(t.shape[:-1], dtype=torch.float32, device=t.device)
    for i in range(t.shape[-1]):
        s = s + t[..., i]
    return s


def _fp16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).to(torch.float32)


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed value of largest magnitude per row (first of ties) and that magnitude."""
    i = x.abs().argmax(dim=1, keepdim=True)
    mx = x.gather(1, i).squeeze(1)
    return mx, mx.abs()


def _qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """``make_qkx2_quants`` on every row of ``x`` ``[B, n]`` with weights ``w``: (L, scale, the_min)."""
    mn, mx = x[:, 0].clone(), x[:, 0].clone()
    sum_w, sum_x = w[:, 0].clone(), w[:, 0] * x[:, 0]
    for i in range(1, x.shape[1]):
        mn = torch.where(x[:, i] < mn, x[:, i], mn)
        mx = torch.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    err = (lambda d: d.abs()) if use_mad else (lambda d: d * d)
    iscale = _f(nmax, mx) / (mx - mn)
    scale = _f(1.0, iscale) / iscale
    L = _nearest(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    best = _seq_sum(w * err(scale[:, None] * L + mn[:, None] - x))
    for step in range(
        nstep + 1
    ):  # min moves with each better fit, and the next step scales from it (as in C)
        iscale = (_f(np.float32(rmin) + np.float32(rdelta) * np.float32(step), mx) + _f(nmax, mx)) / (mx - mn)
        la = _nearest(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
        lf = la.to(torch.float32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lf), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = _seq_sum(w * err(this_scale[:, None] * lf + this_min[:, None] - x))
        better = (D > 0) & (cur < best) & ~flat
        L = torch.where(better[:, None], la, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return L, scale, -mn


def _qx(x: torch.Tensor, nmax: int):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on every row: (L, scale)."""
    mx, amax = _first_absmax(x)
    zero = amax < _EPS
    w = x * x
    wx = w * x

    def sums(iscale):
        lf = _nearest(iscale[:, None] * x).clamp(-nmax, nmax - 1).to(torch.float32)
        return lf, _seq_sum(wx * lf), _seq_sum(w * lf * lf)

    lf, sumlx, suml2 = sums(_f(-nmax, mx) / mx)
    L = lf + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        lf, sumlx, suml2 = sums(-_f(np.float32(nmax) + np.float32(0.1) * np.float32(step), mx) / mx)
        up = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(up[:, None], lf + nmax, L)
        scale = torch.where(up, sumlx / suml2, scale)
        best = torch.where(up, scale * sumlx, best)
    return torch.where(zero[:, None], torch.zeros_like(L), L), torch.where(
        zero, torch.zeros_like(scale), scale
    )


def _q3(x: torch.Tensor, nmax: int = 4):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every row: (L, scale)."""
    mx, amax = _first_absmax(x)
    zero = amax < _EPS
    L = _nearest((_f(-nmax, mx) / mx)[:, None] * x).clamp(-nmax, nmax - 1).to(torch.float32)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seq_sum(wx * L), _seq_sum(w * L * L)
    active = ~zero
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(x.shape[1]):
            li, xi, wi, wxi = L[:, i], x[:, i], w[:, i], wx[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = _nearest(xi * sl2 / slx).clamp(-nmax, nmax - 1).to(torch.float32)
            slx2, sl22 = slx + wxi * new, sl2 + wi * new * new
            ok = active & (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = torch.where(ok, new, li)
            sumlx, suml2 = torch.where(ok, slx2, sumlx), torch.where(ok, sl22, suml2)
            changed |= ok
        active &= changed
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    return torch.where(zero[:, None], torch.zeros_like(L), L + nmax), torch.where(
        zero, torch.zeros_like(scale), scale
    )


def quantize(x: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """``quantize_row_<kind>_ref`` on ``x`` ``[S, 256]`` fp32 super-blocks: the stored fields, as tensors: ``d``
    (and ``dmin``) fp16 values held as fp32 ``[S]``, the sub-block scale (and min) codes ``sc`` (``m``) ``[S, j]``
    as the dequantizer reads them, and the codes ``q`` ``[S, 256]``."""
    x = x.to(torch.float32)
    S = x.shape[0]
    if kind in ("q4_K", "q5_K", "q2_K"):
        n, nmax = (16, 3) if kind == "q2_K" else (32, 15 if kind == "q4_K" else 31)
        xb = x.reshape(-1, n)
        if kind == "q2_K":
            w = xb.abs()
            L, scales, mins = _qkx2(xb, w, 3, -0.5, 0.1, 15, True)
        else:
            # sqrtf, correctly rounded (torch's float32 sqrt on the CPU may be an ulp off): via float64
            sum_x2 = _seq_sum(xb * xb)
            av = torch.sqrt((sum_x2 / _f(32, sum_x2)).double()).float()
            L, scales, mins = _qkx2(xb, av[:, None] + xb.abs(), nmax, -1.0 if kind == "q4_K" else -0.5, 0.1,
                                    20 if kind == "q4_K" else 15, False)  # fmt: skip
        scales, mins = scales.reshape(S, -1), mins.reshape(S, -1)
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        max_scale, max_min = torch.maximum(scales.amax(1), zero), torch.maximum(mins.amax(1), zero)
        top = _f(15 if kind == "q2_K" else 63, max_scale)
        inv_s = torch.where(max_scale > 0, top / max_scale, zero)
        inv_m = torch.where(max_min > 0, top / max_min, zero)
        ls, lm = _nearest(inv_s[:, None] * scales) & 0xFF, _nearest(inv_m[:, None] * mins) & 0xFF
        if kind == "q2_K":  # one byte: scale code | min code << 4 (the min only when max_min > 0)
            byte = (ls | torch.where((max_min > 0)[:, None], lm << 4, torch.zeros_like(lm))) & 0xFF
            sc, m = byte & 0xF, byte >> 4
        else:
            sc, m = ls.clamp(max=63), lm.clamp(max=63)
        d, dmin = _fp16(max_scale / top), _fp16(max_min / top)
        dd = d[:, None] * sc.to(torch.float32)
        dm = dmin[:, None] * m.to(torch.float32)
        xs = x.reshape(S, -1, n)
        fresh = _nearest((xs + dm[..., None]) / dd[..., None]).clamp(0, nmax)
        q = torch.where((dd != 0)[..., None], fresh, L.reshape(S, -1, n)).reshape(S, QK_K)
        return {"d": d, "dmin": dmin, "sc": sc, "m": m, "q": q}
    if kind == "q3_K":
        L, scales = _q3(x.reshape(-1, 16))
        scales = scales.reshape(S, 16)
        max_scale, _ = _first_absmax(scales)
        nonzero = max_scale != 0
        iscale = _f(-32.0, max_scale) / max_scale
        l8 = ((_nearest(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t
        sc = torch.where(nonzero[:, None], l8.clamp(-32, 31), torch.full_like(l8, -32))
        d = torch.where(nonzero, _fp16(_f(1.0, iscale) / iscale), torch.zeros_like(max_scale))
        dd = d[:, None] * sc.to(torch.float32)
        fresh = _nearest(x.reshape(S, 16, 16) / dd[..., None]).clamp(-4, 3) + 4
        q = torch.where((dd != 0)[..., None], fresh.to(torch.float32), L.reshape(S, 16, 16)).reshape(S, QK_K)
        return {"d": d, "sc": sc, "q": q.to(torch.int32)}
    if kind == "q6_K":
        L, scales = _qx(x.reshape(-1, 16), 32)
        scales = scales.reshape(S, 16)
        max_scale, amax = _first_absmax(scales)
        zero = amax < _EPS
        iscale = _f(-128.0, max_scale) / max_scale
        sc = ((_nearest(iscale[:, None] * scales).clamp(max=127) + 128) & 0xFF) - 128  # int8_t
        d = _fp16(_f(1.0, iscale) / iscale)
        dd = d[:, None] * sc.to(torch.float32)
        fresh = (_nearest(x.reshape(S, 16, 16) / dd[..., None]).clamp(-32, 31) + 32).to(torch.float32)
        q = torch.where((dd != 0)[..., None], fresh, L.reshape(S, 16, 16)).reshape(S, QK_K)
        # an all-zero super-block is stored as zeros
        zeros = torch.zeros_like
        return {"d": torch.where(zero, zeros(d), d), "sc": torch.where(zero[:, None], zeros(sc), sc),
                "q": torch.where(zero[:, None], zeros(q), q).to(torch.int32)}  # fmt: skip
    raise ValueError(f"unknown K-quant {kind!r}; valid: {', '.join(KQUANTS)}")


def dequantize(fields: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """``dequantize_row_<kind>``: ``[S, 256]`` fp32, each value computed in the C code's order."""
    q = fields["q"].to(torch.float32)
    S = q.shape[0]
    sc = fields["sc"].to(torch.float32)
    if kind in ("q2_K", "q4_K", "q5_K"):
        n = 16 if kind == "q2_K" else 32
        dl = fields["d"][:, None] * sc  # d1 = d * sc
        ml = fields["dmin"][:, None] * fields["m"].to(torch.float32)  # m1 = min * m
        return (dl[..., None] * q.reshape(S, -1, n) - ml[..., None]).reshape(S, QK_K)
    dl = fields["d"][:, None] * sc  # q3_K: d_all * (scale - 32); q6_K: d * sc
    offset = 4 if kind == "q3_K" else 32
    return (dl[..., None] * (q.reshape(S, 16, 16) - offset)).reshape(S, QK_K)


def fake_quant(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """``rows`` ``[n, k]`` (k a multiple of 256) quantized and dequantized as llama.cpp does: fp32 ``[n, k]``."""
    n, k = rows.shape
    if k % QK_K:
        raise ValueError(f"{kind} needs rows of a multiple of {QK_K} values, got {k}")
    blocks = rows.reshape(-1, QK_K).to(torch.float32)
    return dequantize(quantize(blocks, kind), kind).reshape(n, k)


def _half_bytes(v: torch.Tensor) -> np.ndarray:
    return v.cpu().numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 bytes holding 8 six-bit scale codes and 8 six-bit min codes (q4_K, q5_K)."""
    out = np.zeros((sc.shape[0], 12), np.int64)
    out[:, :4], out[:, 4:8] = sc[:, :4], m[:, :4]
    out[:, 8:] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    out[:, :4] |= (sc[:, 4:] >> 4) << 6
    out[:, 4:8] |= (m[:, 4:] >> 4) << 6
    return out.astype(np.uint8)


def _two_bit(L: np.ndarray) -> np.ndarray:
    """64 bytes of 2-bit codes: two halves of 128, four codes 32 apart per byte (q2_K, q3_K)."""
    h = L.reshape(-1, 2, 4, 32)
    return (
        (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6))
        .reshape(-1, 64)
        .astype(np.uint8)
    )


def pack(fields: dict[str, torch.Tensor], kind: str) -> np.ndarray:
    """The stored bytes ``[S, BLOCK_BYTES[kind]]`` (uint8) of :func:`quantize`'s fields, laid out as ggml's
    ``block_<kind>`` (what the tests compare with llama.cpp's own quantizer, byte for byte)."""
    L = fields["q"].cpu().numpy().astype(np.int64)
    sc = fields["sc"].cpu().numpy().astype(np.int64)
    if kind == "q2_K":
        scales = (sc | (fields["m"].cpu().numpy().astype(np.int64) << 4)).astype(np.uint8)
        parts = [scales, _two_bit(L), _half_bytes(fields["d"]), _half_bytes(fields["dmin"])]
    elif kind == "q3_K":
        high = L > 3
        low = np.where(high, L - 4, L)
        hmask = (high.reshape(-1, 8, 32) << np.arange(8)[None, :, None]).sum(1).astype(np.uint8)
        code = sc + 32  # 6 bits: the low 4 in bytes 0-7 (two per byte), the high 2 in bytes 8-11
        scales = np.zeros((L.shape[0], 12), np.uint8)
        scales[:, :8] = (code[:, :8] & 0xF) | ((code[:, 8:] & 0xF) << 4)
        hi = (code >> 4).reshape(-1, 4, 4)  # [j // 4, j % 4]
        scales[:, 8:] = (hi << (2 * np.arange(4))[None, :, None]).sum(1)
        parts = [hmask, _two_bit(low), scales, _half_bytes(fields["d"])]
    elif kind in ("q4_K", "q5_K"):
        m = fields["m"].cpu().numpy().astype(np.int64)
        h = L.reshape(
            -1, 4, 2, 32
        )  # 4 chunks of 64: the first 32 in low nibbles, the next 32 in high nibbles
        qs = ((h[:, :, 0] & 0xF) | ((h[:, :, 1] & 0xF) << 4)).reshape(-1, 128).astype(np.uint8)
        parts = [_half_bytes(fields["d"]), _half_bytes(fields["dmin"]), _k4_scales(sc, m)]
        if kind == "q5_K":  # the fifth bit of code j of chunk c at bit 2c (first half) / 2c+1 (second half)
            bits = (h >> 4) & 1
            shift = 2 * np.arange(4)[None, :, None]
            parts.append(((bits[:, :, 0] << shift) | (bits[:, :, 1] << (shift + 1))).sum(1).astype(np.uint8))
        parts.append(qs)
    elif kind == "q6_K":
        h = L.reshape(-1, 2, 4, 32)  # two halves of 128; codes 32 apart
        ql = np.concatenate([(h[:, :, 0] & 0xF) | ((h[:, :, 2] & 0xF) << 4),
                             (h[:, :, 1] & 0xF) | ((h[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)  # fmt: skip
        qh = (
            (h[:, :, 0] >> 4) | ((h[:, :, 1] >> 4) << 2) | ((h[:, :, 2] >> 4) << 4) | ((h[:, :, 3] >> 4) << 6)
        )
        parts = [ql.astype(np.uint8), qh.reshape(-1, 64).astype(np.uint8), sc.astype(np.int8).view(np.uint8),
                 _half_bytes(fields["d"])]  # fmt: skip
    else:
        raise ValueError(f"unknown K-quant {kind!r}; valid: {', '.join(KQUANTS)}")
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == BLOCK_BYTES[kind], (kind, out.shape)
    return out
