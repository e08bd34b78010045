"""Real runtimes measure an export on the same windows as qsweep's simulation.

* GGUF: llama-cpp-python (llama.cpp built from its source distribution) evaluates each window of the same token ids
  (no re-tokenisation), with every position's logits (``logits_all``); the NLL of the scored targets is taken
  from those logits in float64 with qsweep's window protocol (:func:`qsweep.evaluate.sliding_windows`), so the
  result is an :class:`~qsweep.evaluate.EvalResult` comparable window by window with qsweep's.
* compressed-tensors: transformers loads the checkpoint (compressed-tensors decompresses it) and qsweep's own
  :class:`~qsweep.evaluate.Evaluator` scores it: the runtime under test is the loading/decompression path.

Why the GGUF numbers differ slightly from the simulation although the weights are identical: llama.cpp computes
differently, not with different weights. Its quantized matmuls quantize the *activations* too (to Q8_0/Q8_1 blocks
of 32, per row) and accumulate integer dot products per block; F32/F16 matmuls accumulate in another order; GELU
uses a tanh approximation (and an fp16 lookup table in some builds); the KV cache is F16 unless ``kv_f32``. The
tolerance qsweep states for the comparison is therefore empirical (README "Export").
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from qsweep.evaluate import EvalResult, sliding_windows
from qsweep.export.common import ExportError

__all__ = ["gguf_perplexity", "llama_cpp_missing"]

_GGML_TYPE_F32 = 0


def llama_cpp_missing() -> str | None:
    """None when llama-cpp-python imports; otherwise why not (for skips and messages)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f'llama-cpp-python is not installed ({e}); pip install -e ".[export]" builds it (about 4 min)'
    except OSError as e:  # the shared library failed to load
        return f"llama-cpp-python is installed but its library does not load: {e}"
    return None


def gguf_perplexity(
    path: str | Path,
    ids: torch.Tensor,
    context: int,
    stride: int,
    *,
    threads: int | None = None,
    kv_f32: bool = True,
) -> EvalResult:
    """Perplexity of the GGUF file ``path`` under llama.cpp on ``ids`` ``[N]`` with qsweep's sliding windows.

    ``kv_f32`` keeps the KV cache in F32 (llama.cpp's default is F16)."""
    missing = llama_cpp_missing()
    if missing:
        raise ExportError(missing)
    import llama_cpp

    windows = sliding_windows(int(ids.numel()), context, stride)
    ids = ids.reshape(-1).tolist()
    kwargs = {"type_k": _GGML_TYPE_F32, "type_v": _GGML_TYPE_F32} if kv_f32 else {}
    threads = threads or min(os.cpu_count() or 1, 8)
    llm = _load(llama_cpp, str(path), context, threads, kwargs)
    start = time.perf_counter()
    window_nll = torch.zeros(len(windows), dtype=torch.float64)
    try:
        for i, w in enumerate(windows):
            tokens = ids[w.begin : w.end]
            llm.reset()
            llm.eval(tokens)
            n = len(tokens)
            logits = np.asarray(llm.scores[: n - 1], dtype=np.float64)[
                n - 1 - w.n_scored :
            ]  # [n_scored, vocab]
            targets = np.asarray(tokens[n - w.n_scored :])
            top = logits.max(axis=1)
            lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            window_nll[i] = float((lse - logits[np.arange(len(targets)), targets]).sum())
    finally:
        llm.close()
    tokens = torch.tensor([w.n_scored for w in windows], dtype=torch.int64)
    total = float(window_nll.sum())
    error = None if math.isfinite(total) else "non-finite loss under llama.cpp"
    return EvalResult(total, int(tokens.sum()), window_nll, tokens, time.perf_counter() - start, error)


def _load(llama_cpp, path: str, context: int, threads: int, kwargs: dict):
    """A ``llama_cpp.Llama`` with logits for every position (the context is the window length)."""
    try:
        return llama_cpp.Llama(
            model_path=path,
            n_ctx=context,
            n_batch=context,
            n_ubatch=context,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
            **kwargs,
        )
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise ExportError(f"llama.cpp cannot load {path!r}: {e}") from None
