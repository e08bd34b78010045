"""The llama.cpp side of the GGUF runtime check, run as a script in a child process (:mod:`qsweep.export.runtime`).

A native crash (a segmentation fault in a ggml kernel) kills this process only: the parent reports it as one line
and keeps the export. So this file imports nothing of qsweep (it is run by path, not as ``-m``, and needs only
numpy and llama-cpp-python) and talks to its parent through two files: it reads a JSON request from ``argv[1]``
(``model``, ``ids``, ``windows`` as ``[begin, end, n_scored]``, ``context``, ``threads``, ``kv_f32``,
``verbose``, and optionally ``reference``, a second GGUF file) and writes ``{"window_nll": [...], "seconds": s}``
(with a reference, also ``token_kld`` and ``same_top1`` per scored token) to ``argv[2]``.

It drives llama.cpp's C API (llama-cpp-python's ctypes bindings) rather than ``llama_cpp.Llama`` because the model
must be loaded with ``use_extra_bufts = False``, which ``Llama`` does not expose. The extra buffer types are where
llama.cpp repacks weights for a CPU's special kernels; on Intel CPUs with AMX (``AMX_INT8 = 1 | REPACK = 1``),
llama.cpp's AMX matmul (``ggml_backend_amx_mul_mat``) segfaults on quantized weights for batches of 2+ tokens,
and every window here is a batch. Without them the standard CPU kernels run (the same ones AMD and older Intel
CPUs run), the perplexities are unchanged (within 0.02% of the simulation either way), and the check is the same
computation on every x86 CPU.
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
import time

import numpy as np

_GGML_TYPE_F32 = 0


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed NLL in float64 of ``targets`` ``[n]`` under ``logits`` ``[n, vocab]``."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return float((lse - logits[np.arange(len(targets)), targets]).sum())


def _kld(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token KL(reference || model) in float64 and whether the top-1 tokens agree."""

    def logsoftmax(x):
        x = x.astype(np.float64)
        top = x.max(axis=1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))

    lp, lq = logsoftmax(ref_logits), logsoftmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1), ref_logits.argmax(axis=1) == logits.argmax(axis=1)


def _open(lib, path: str, context: int, threads: int, kv_f32: bool):
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.use_extra_bufts = False  # no AMX/repacked weights: see the module docstring
    model = lib.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp cannot load {path!r}")
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = context  # one window is one batch
    cparams.n_threads = cparams.n_threads_batch = threads
    if kv_f32:
        cparams.type_k = cparams.type_v = _GGML_TYPE_F32
    ctx = lib.llama_init_from_model(model, cparams)
    if not ctx:
        lib.llama_model_free(model)
        raise SystemExit(f"llama.cpp cannot create a context of {context} tokens for {path!r}")
    return model, ctx


def _logits(lib, ctx, batch, tokens: list[int], n_scored: int, n_vocab: int) -> np.ndarray:
    """The logits ``[n_scored, vocab]`` (a copy) of a window's scored positions."""
    n = len(tokens)
    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
    batch.n_tokens = n
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    rc = lib.llama_decode(ctx, batch)
    if rc != 0:
        raise SystemExit(f"llama_decode returned {rc} on a window of {n} tokens")
    ptr = ctypes.cast(lib.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(ptr, shape=(n, n_vocab))[n - 1 - n_scored : n - 1].copy()


def run(request: dict) -> dict:
    """Window NLLs of ``request["model"]`` under llama.cpp (see the module docstring for the request's keys); with
    ``reference`` (another GGUF file: the baseline's), also each scored token's KL(reference || model) and whether
    the top-1 tokens agree, as ``llama-perplexity --kl-divergence`` computes them from the two models' logits."""
    import llama_cpp

    # llama.cpp's log (to stderr) only on errors, unless ``verbose``
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if request.get("verbose") else logging.ERROR)
    lib = llama_cpp.llama_cpp
    lib.llama_backend_init()
    context, threads, kv_f32 = int(request["context"]), int(request["threads"]), request.get("kv_f32", True)
    opened = [_open(lib, request["model"], context, threads, kv_f32)]
    if request.get("reference"):
        opened.append(_open(lib, request["reference"], context, threads, kv_f32))
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(opened[0][0]))
    batch = lib.llama_batch_init(context, 0, 1)
    ids = request["ids"]
    window_nll, kld, same = [], [], []
    start = time.perf_counter()
    try:
        for begin, end, n_scored in request["windows"]:
            tokens = ids[begin:end]
            logits = _logits(lib, opened[0][1], batch, tokens, n_scored, n_vocab)
            window_nll.append(_nll(logits, np.asarray(tokens[len(tokens) - n_scored :])))
            if len(opened) > 1:
                k, agree = _kld(_logits(lib, opened[1][1], batch, tokens, n_scored, n_vocab), logits)
                kld += k.tolist()
                same += agree.tolist()
    finally:
        lib.llama_batch_free(batch)
        for model, ctx in opened:
            lib.llama_free(ctx)
            lib.llama_model_free(model)
    out = {"window_nll": window_nll, "seconds": time.perf_counter() - start}
    if len(opened) > 1:
        out.update(token_kld=kld, same_top1=same)
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = run(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
