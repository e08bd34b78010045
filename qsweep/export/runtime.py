"""Real runtimes measure an export on the same windows as qsweep's simulation.

* GGUF: llama-cpp-python (llama.cpp built from its source distribution) evaluates each window of the same token ids
  (no re-tokenisation), with every position's logits, in a child process (:mod:`qsweep.export.llama_child`, which
  also says why the model is loaded without llama.cpp's extra buffer types: AMX); the NLL of the scored targets is taken
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

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qsweep.evaluate import EvalResult, sliding_windows
from qsweep.export.common import ExportError

__all__ = ["RuntimeCheckFailed", "gguf_perplexity", "llama_cpp_missing"]


class RuntimeCheckFailed(ExportError):
    """The real runtime crashed or failed on a file that was written and verified: the export stands, its check
    has no result."""


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
    reference: str | Path | None = None,
) -> EvalResult:
    """Perplexity of the GGUF file ``path`` under llama.cpp on ``ids`` ``[N]`` with qsweep's sliding windows.

    llama.cpp runs in a child process (:mod:`qsweep.export.llama_child`): a crash of the native library raises
    :class:`RuntimeCheckFailed` with one line, and the caller (an export, a test run) goes on. ``kv_f32`` keeps
    the KV cache in F32 (llama.cpp's default is F16). ``reference``: another GGUF file (the baseline's); the result
    then also holds llama.cpp's per-token KL(reference || this) and top-1 agreement (``token_kld``, ``same_top1``),
    computed from the two models' logits as ``llama-perplexity --kl-divergence`` does."""
    missing = llama_cpp_missing()
    if missing:
        raise ExportError(missing)
    windows = sliding_windows(int(ids.numel()), context, stride)
    threads = int(threads or min(os.cpu_count() or 1, 8))
    request = {
        "model": str(Path(path).resolve()),
        "ids": ids.reshape(-1).tolist(),
        "windows": [[w.begin, w.end, w.n_scored] for w in windows],
        "context": int(context),
        "threads": threads,
        "kv_f32": bool(kv_f32),
        "reference": None if reference is None else str(Path(reference).resolve()),
    }
    out = _run_child(request, threads)
    window_nll = torch.tensor(out["window_nll"], dtype=torch.float64)
    tokens = torch.tensor([w.n_scored for w in windows], dtype=torch.int64)
    total = float(window_nll.sum())
    error = None if math.isfinite(total) else "non-finite loss under llama.cpp"
    kld = None if "token_kld" not in out else torch.tensor(out["token_kld"], dtype=torch.float32)
    same = None if "same_top1" not in out else torch.tensor(out["same_top1"], dtype=torch.bool)
    return EvalResult(total, int(tokens.sum()), window_nll, tokens, float(out["seconds"]), error,
                      token_kld=kld, same_top1=same)  # fmt: skip


def _run_child(request: dict, threads: int) -> dict:
    """Run :mod:`qsweep.export.llama_child` on ``request``; its result, or one-line RuntimeCheckFailed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # llama.cpp's OpenMP pool: no oversubscription
    with tempfile.TemporaryDirectory(prefix="qsweep-llama-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("llama_child.py")), str(req), str(res)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            errors="replace", check=False,
        )  # fmt: skip
        if proc.returncode == 0 and res.exists():
            return json.loads(res.read_text())
    model = Path(request["model"]).name  # records name no local path
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        raise RuntimeCheckFailed(
            f"llama.cpp crashed ({name}) evaluating {model!r}; the runtime check has no result, the exported "
            "file is kept (export.runtime=false skips the check)"
        )
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    why = lines[-1] if lines else f"exit status {proc.returncode}"
    raise RuntimeCheckFailed(f"llama.cpp failed evaluating {model!r}: {why}")
