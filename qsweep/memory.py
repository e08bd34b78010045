"""Know before you load: the memory a run needs, from the model's config alone, against what the device has.

A session holds the model in the evaluation dtype, one pristine copy of the weights in the checkpoint's dtype (on
the device, or in host memory with ``eval.pristine=cpu``), a cache of quantized tensors of at most
``eval.cache_mb``, and the activations of one batch of ``eval.batch_size`` windows of ``eval.context`` tokens (an
evaluation keeps one layer's tensors alive at a time and at most ``logits_chunk`` rows of logits; the proxy
sensitivity's backward pass keeps one hidden state per layer, layers checkpointed). :func:`estimate_memory` adds
these up; :func:`check_fits` refuses, in one line naming the settings that lower it, a run that cannot fit. The KL
reference (qsweep.heads: ``eval.kld``) is checked per split once its tokens are known (:func:`check_reference_fits`).
The estimate is deliberately simple (a few named terms, within about 20% of what ``python -m qsweep.bench.scale``
measures); allocator overheads are covered by a margin.

Also here: the evaluation dtype policy (:func:`resolve_eval_dtype`) and the one-line message of an out-of-memory
error that happens anyway (:func:`out_of_memory_message`).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field

import torch

from qsweep.apply import DEFAULT_CACHE_BYTES
from qsweep.errors import ConfigError, QsweepError
from qsweep.evaluate import default_logits_chunk

__all__ = [
    "DTYPES",
    "PROXY_PASS_TOKENS",
    "MemoryEstimate",
    "ResourceError",
    "activation_bytes",
    "available_bytes",
    "cache_bytes_for",
    "check_fits",
    "check_reference_fits",
    "estimate_memory",
    "is_out_of_memory",
    "large_tensors_outside_the_heap",
    "out_of_memory_message",
    "peak_host_rss_bytes",
    "proxy_pass_tokens",
    "release_host_memory",
    "resolve_eval_dtype",
    "split_across_gpus",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 2**30
# The proxy sensitivity's backward passes cover at most this many tokens each (whole windows; a batch is split into
# passes): what one pass keeps for its backward grows with it, whatever eval.batch_size is. See proxy_pass_tokens.
PROXY_PASS_TOKENS = 4096
MARGIN = 1.10  # allocator fragmentation and the framework's own buffers, on top of the named terms


class ResourceError(QsweepError, RuntimeError):
    """The run needs more memory than the device has; the message says how much, and what lowers it."""


def resolve_eval_dtype(name: str | None, checkpoint: torch.dtype, device: torch.device) -> str:
    """``eval.dtype``: ``auto`` (or null) is the checkpoint's dtype on a GPU when it is 16-bit (a bf16 checkpoint
    evaluates in bf16, as its users run it), else fp32 (the CPU, fp32 checkpoints: exact); or one of DTYPES."""
    if name in (None, "auto"):
        if device.type == "cuda" and checkpoint in (torch.bfloat16, torch.float16):
            return "bf16" if checkpoint == torch.bfloat16 else "fp16"
        return "fp32"
    if name not in DTYPES:
        raise ConfigError(f"unknown eval.dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return str(name)


def proxy_pass_tokens(device: torch.device) -> int:
    """Tokens per proxy backward pass on ``device``: PROXY_PASS_TOKENS on a GPU (fewer, larger kernels), half of it
    on the CPU, where a 2-core matmul is as fast per token at 2048 rows and host memory is the scarce resource.
    Measured on a SmolLM2-135M shape (context 512, 4096 tokens, 2 cores; with large_tensors_outside_the_heap at
    1 MiB): the proxy's peak RSS fell from 2.22 to 1.91 GiB, in about the same time (83-109 s against 82-93 s)."""
    return PROXY_PASS_TOKENS if device.type == "cuda" else PROXY_PASS_TOKENS // 2


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _shape(config) -> dict[str, int]:
    """hidden, ffn, layers, vocab of a transformers config (GPT-2, OPT, Llama-style names)."""

    def first(*keys: str, default: int) -> int:
        return next((int(getattr(config, k)) for k in keys if getattr(config, k, None)), default)

    hidden = first("hidden_size", "n_embd", "d_model", default=0)
    return {
        "hidden": hidden,
        "ffn": first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        "layers": first("num_hidden_layers", "n_layer", default=1),
        "vocab": first("vocab_size", default=0),
    }


def activation_bytes(
    config, tokens: int, dtype: torch.dtype, *, logits_rows: int, backward: bool = False
) -> int:
    """Activation bytes of a forward over ``tokens`` tokens (a batch): one layer's live tensors (hidden states,
    q/k/v, the MLP's intermediate) and ``logits_rows`` rows of fp32 logits with their softmax; with ``backward``,
    also one saved hidden state per layer (layer checkpointing) and the recomputed layer's saved tensors."""
    s, b = _shape(config), _size(dtype)
    layer = tokens * (6 * s["hidden"] + 3 * s["ffn"]) * b
    logits = 3 * logits_rows * s["vocab"] * 4 + tokens * s["hidden"] * 4
    if not backward:
        return layer + logits
    saved = s["layers"] * tokens * s["hidden"] * b
    return saved + 3 * layer + 2 * logits


@dataclass
class MemoryEstimate:
    """Bytes a session needs, by term, on its device (and in host memory when the pristine copy is there)."""

    device: str
    dtype: str
    n_params: int
    weights: int
    pristine: int
    pristine_on_host: bool
    cache: int
    activations: int
    settings: dict = field(default_factory=dict)

    @property
    def device_bytes(self) -> int:
        on_device = (
            self.weights + self.cache + self.activations + (0 if self.pristine_on_host else self.pristine)
        )
        return int(MARGIN * on_device)

    @property
    def host_bytes(self) -> int:
        return self.pristine if self.pristine_on_host else 0

    def terms(self) -> str:
        parts = [f"weights {self.weights / GIB:.1f} GiB {self.dtype}"]
        if not self.pristine_on_host:
            parts.append(f"pristine copy {self.pristine / GIB:.1f} GiB")
        parts += [f"quantization cache {self.cache / GIB:.1f} GiB",
                  f"activations {self.activations / GIB:.1f} GiB"]  # fmt: skip
        return ", ".join(parts)


def _n_params(config) -> int:
    from qsweep.model import meta_model

    return sum(p.numel() for p in meta_model(config).parameters())


def estimate_memory(
    config,
    device: torch.device,
    *,
    dtype: str,
    checkpoint: torch.dtype,
    pristine: str = "device",
    cache_bytes: int | None = 0,
    batch_size: int = 8,
    context: int = 1024,
    logits_chunk: int | None = None,
    max_tokens: int | None = None,
    backward: bool = True,
    device_map: str | None = None,
) -> MemoryEstimate:
    """What a session of this config needs (see the module docstring). ``backward``: a search's proxy sensitivity
    runs backward passes (of at most :func:`proxy_pass_tokens` tokens), which keep more than an evaluation."""
    n = _n_params(config)
    live = DTYPES[dtype]
    weights = n * _size(live)
    tokens = min(batch_size * context, max_tokens or batch_size * context)
    rows = min(tokens, logits_chunk or default_logits_chunk(device))
    acts = activation_bytes(config, tokens, live, logits_rows=rows)
    if backward:
        pass_tokens = min(tokens, max(context, proxy_pass_tokens(device) // context * context))
        acts = max(acts, activation_bytes(config, pass_tokens, live, logits_rows=rows, backward=True))
    return MemoryEstimate(
        device=str(device) if device_map is None else f"{device_map} device map",
        dtype=dtype,
        n_params=n,
        weights=weights,
        pristine=n * _size(checkpoint),
        pristine_on_host=pristine == "cpu",
        cache=cache_bytes_for(cache_bytes, weights),
        activations=acts,
        settings={"batch_size": batch_size, "context": context},
    )


def cache_bytes_for(cache_bytes: int | None, weights_bytes: int) -> int:
    """The quantized-tensor cache's budget: ``cache_bytes`` (``eval.cache_mb`` x 2^20), or for None (null) a
    quarter of the weights' bytes in the evaluation dtype, at most 512 MiB. Measured on a SmolLM2-135M shape on 2
    CPU cores: a unit is re-quantized in milliseconds while an evaluation takes seconds, and 512 MiB would be a
    quarter of that run's whole host budget."""
    if cache_bytes is None:
        return min(DEFAULT_CACHE_BYTES, weights_bytes // 4)
    return int(cache_bytes)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free bytes on ``device`` (a GPU's free memory; the host's MemAvailable) and how they were read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"{device} has {free / GIB:.1f} GiB free"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 2**62, "host memory unknown"
    return avail, f"the host has {avail / GIB:.1f} GiB available"


def _lowering(est: MemoryEstimate) -> str:
    tips = []
    if not est.pristine_on_host and est.device != "cpu":
        tips.append(f"eval.pristine=cpu (-{est.pristine / GIB:.1f} GiB on the device)")
    tips.append(f"a smaller eval.batch_size (now {est.settings['batch_size']}) or eval.context "
                f"(now {est.settings['context']})")  # fmt: skip
    if est.cache:
        tips.append("a smaller eval.cache_mb")
    if est.dtype == "fp32":
        tips.append("eval.dtype=bf16 (halves the weights)")
    if est.device.startswith("cuda"):
        tips.append("eval.device_map=auto (split across the visible GPUs)")
    elif est.device.endswith("device map"):
        tips.append("more GPUs (CUDA_VISIBLE_DEVICES)")
    return "lower it with " + ", ".join(tips)


def check_fits(est: MemoryEstimate) -> None:
    """Raise :class:`ResourceError` when ``est`` cannot fit its device (or the host, for a host-side copy)."""
    if est.device.endswith("device map"):
        return  # accelerate places the layers; the GPUs' sum is checked by its own planner
    device = torch.device(est.device)
    need = est.device_bytes + (est.host_bytes if device.type == "cpu" else 0)
    have, said = available_bytes(device)
    if need > have:
        raise ResourceError(
            f"this run needs about {need / GIB:.1f} GiB on {device} ({est.terms()}, {est.n_params / 1e9:.2f}B "
            f"parameters) but {said}; {_lowering(est)}"
        )
    if est.host_bytes and device.type != "cpu":
        have, said = available_bytes(torch.device("cpu"))
        if est.host_bytes > have:
            raise ResourceError(
                f"this run keeps a pristine copy of {est.host_bytes / GIB:.1f} GiB in host memory "
                f"(eval.pristine=cpu) but {said}; use eval.pristine=device or a machine with more memory"
            )


def check_reference_fits(config, device: torch.device, tokens: int, dtype: torch.dtype, *, with_head: bool,
                         split: str) -> int:  # fmt: skip
    """The KL reference of one split (qsweep.heads: its scored tokens' final hidden states, and the first time a
    copy of the baseline's lm_head), refused in one line when ``device`` has not that much free; returns its
    bytes. Not in :func:`estimate_memory`, which runs before the splits' token counts are known."""
    s = _shape(config)
    need = (tokens + (s["vocab"] if with_head else 0)) * s["hidden"] * _size(dtype)
    have, said = available_bytes(device)
    if MARGIN * need > have:
        raise ResourceError(
            f"the KL reference of split {split!r} ({tokens:,} scored tokens x {s['hidden']:,} hidden values"
            f"{', and a copy of the lm_head' if with_head else ''}, {dtype}) needs {need / GIB:.2f} GiB on {device} "
            f"but {said}; use eval.kld=false (perplexity only, no KL metrics) or fewer tokens (eval.max_tokens)"
        )
    return need


def split_across_gpus(est: MemoryEstimate, free: list[int]) -> dict[int, int]:
    """``max_memory`` for ``device_map="auto"``: the weight bytes each GPU may take, given its free bytes, so that
    every GPU keeps room for one batch's activations and the cache, and for the pristine copy of its own layers
    (when it stays on the device). Raises :class:`ResourceError` when the GPUs together cannot hold the model."""
    reserve = int(MARGIN * (est.activations + est.cache))
    per_weight = 1.0 + (0.0 if est.pristine_on_host else est.pristine / max(est.weights, 1))
    budget = {i: max(0, int((f - reserve) / per_weight)) for i, f in enumerate(free)}
    if sum(budget.values()) < est.weights:
        have = ", ".join(f"cuda:{i} {f / GIB:.1f}" for i, f in enumerate(free)) or "none"
        raise ResourceError(
            f"the model's {est.weights / GIB:.1f} GiB of {est.dtype} weights do not fit the visible GPUs (free GiB: "
            f"{have}) with {reserve / GIB:.1f} GiB kept on each for activations and cache"
            f"{'' if est.pristine_on_host else ' and the pristine copy beside its layers'}; {_lowering(est)}"
        )
    return budget


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` means memory ran out: a device's ``torch.OutOfMemoryError``, Python's ``MemoryError``, or
    the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory"), which is not an
    OutOfMemoryError."""
    if isinstance(err, (_OOM, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in str(err) or "DefaultCPUAllocator: not enough memory" in str(err)
    )


def out_of_memory_message(err: BaseException, est: MemoryEstimate | None, during: str) -> str:
    """One line for an out-of-memory error that happened anyway (the estimate is an estimate)."""
    where = est.device if est is not None else "the device"
    estimated = (
        f" (estimated need {est.device_bytes / GIB:.1f} GiB: {est.terms()})" if est is not None else ""
    )
    lower = _lowering(est) if est is not None else "lower eval.batch_size or eval.context"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"out of memory on {where} during {during}{estimated}: {first[:160]}; {lower}"


def _glibc():
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``), else None."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim, _libc.mallopt  # noqa: B018 - musl and macOS have neither
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


_libc = None
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # the ceiling of glibc's own (dynamic) threshold on 64-bit systems


def peak_host_rss_bytes() -> int:
    """The peak resident set of this process's own image: Linux's ``VmHWM``. Not ``getrusage``'s ``ru_maxrss``,
    which a child started by ``subprocess`` inherits from its parent (vfork + exec): a benchmark run from a 2 GiB
    test process read 2 GiB for a 0.6 GiB search. Elsewhere, ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def release_host_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere). Tensors below
    glibc's mmap threshold (up to 32 MiB) live in the heap, and what an evaluation or a backward pass frees stays
    resident there, fragmented, until trimmed: measured on a SmolLM2-135M shape on 2 CPU cores, the resident set
    after the proxy sensitivity fell from 3.7 to 1.2 GiB. Costs milliseconds."""
    libc = _glibc()
    if libc:
        gc.collect()  # tensors held only by reference cycles (autograd closures, hooks) go first
        libc.malloc_trim(0)


@contextlib.contextmanager
def large_tensors_outside_the_heap(threshold: int = 2**20):
    """Within: host allocations of ``threshold`` bytes or more are their own mappings (glibc's
        ``M_MMAP_THRESHOLD``), returned to the OS when freed; after: glibc's ceiling (32 MiB). The heap is trimmed on
    entry (what earlier evaluations left there would otherwise stay under the peak) and on exit.

        For a backward pass on the CPU: the per-layer tensors it keeps (checkpointed inputs) interleave in the heap with
        the transients of every layer, which then cannot be reused. Measured on a SmolLM2-135M shape (4,096 tokens, 30
        layers, 2 cores): the checkpointed forward kept 0.29 GiB of tensors but grew the resident set by 1.41 GiB; with
        an 8 MiB threshold, 0.31 GiB. With 2,048-token passes (:func:`proxy_pass_tokens`) a hidden state is 4.5 MiB:
        the proxy's peak was 2.03 GiB at 4 MiB, 1.91 GiB at 1 MiB, in the same time within the machine's noise. Not for
        evaluations: fresh mappings cost their page faults (+20% per evaluation there)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    release_host_memory()
    libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
        release_host_memory()
