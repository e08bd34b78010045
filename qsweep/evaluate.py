"""Perplexity with sliding windows: exactly the HF guide's protocol, batched and memory-light.

Protocol (``sliding_windows``): for begin in 0, stride, 2*stride, ...: ``end = min(begin + context, N)``; the window
is ``ids[begin:end]``; the tokens scored are the last ``end - prev_end`` targets of the window after the
one-position label shift (all ``len - 1`` of them when that count is larger); ``prev_end = end``; stop once
``end == N``. So with ``stride == context`` the first token of every window is unscored, and with ``stride < context``
every token after the first is scored exactly once with at least ``context - stride`` tokens of context.
Perplexity = exp(sum of NLL over scored tokens / number of scored tokens), accumulated in float64.

Speed (``Evaluator``): windows of equal length are batched; the base model runs once per batch under inference
mode (SDPA attention); only the hidden states of scored positions are gathered and pushed through the lm_head and
cross-entropy in row chunks, so the full ``[batch, T, vocab]`` logits never exist. ``dtype`` selects fp32 (exact,
default) or bf16/fp16 autocast (GPU); ``compile`` wraps the base model in ``torch.compile``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from qsweep.device import DEVICES, resolve_device
from qsweep.errors import ConfigError
from qsweep.heads import Reference, checkpointed_layers, score_batch

__all__ = [
    "CI_MIN_TOKENS",
    "CI_MIN_WINDOWS",
    "COMPUTE_DTYPES",
    "DEVICES",
    "MIN_SCORED_TOKENS",
    "EvalResult",
    "Evaluator",
    "Window",
    "partial_result",
    "resolve_device",
    "sliding_windows",
]

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Sample size of one evaluation. Below MIN_SCORED_TOKENS a perplexity is refused (a handful of tokens measures
# nothing); below CI_MIN_TOKENS or CI_MIN_WINDOWS it is warned about: the paired CI treats windows as samples, and
# a spread over one to three windows is not an interval worth reporting.
MIN_SCORED_TOKENS = 32
CI_MIN_TOKENS = 100
CI_MIN_WINDOWS = 4


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    n_scored: int  # the last n_scored targets of ids[begin:end] (after the label shift) are scored


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The HF guide's windows over ``n_tokens`` ids (see module docstring)."""
    if context < 2:
        raise ConfigError(f"eval.context must be >= 2, got {context} (null: the model's maximum)")
    if not 1 <= stride <= context:
        raise ConfigError(
            f"eval.stride must be in [1, context={context}], got {stride} (null: stride = context)"
        )
    if n_tokens < 2:
        raise ConfigError(f"need at least 2 tokens to score one, got {n_tokens}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            windows.append(Window(begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class EvalResult:
    """NLL over the scored tokens, per window too (for paired confidence intervals), or the reason it failed."""

    nll_sum: float
    n_tokens: int
    window_nll: torch.Tensor  # [n_windows] float64, NLL summed per window
    window_tokens: torch.Tensor  # [n_windows] int64, scored tokens per window
    seconds: float
    error: str | None = None
    extra: dict = field(default_factory=dict)
    split_tokens: int = 0  # the scored tokens of the whole split (0: unknown; a partial result has fewer)
    # per scored token, against the split's reference (the baseline; qsweep.heads): KL(baseline || this), and whether
    # the top-1 token is the baseline's; None without a reference
    token_kld: torch.Tensor | None = None
    same_top1: torch.Tensor | None = None

    @property
    def share(self) -> float:
        """The share of the split's scored tokens this result covers (1.0 for a full evaluation)."""
        return self.n_tokens / self.split_tokens if self.split_tokens else 1.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def window_kld(self) -> torch.Tensor | None:
        """``[n_windows]`` float64: the per-token KL summed per window (tokens are in window order), or None
        without a reference."""
        if self.token_kld is None or len(self.token_kld) != int(self.window_tokens.sum()):
            return None
        ids = torch.repeat_interleave(torch.arange(len(self.window_tokens)), self.window_tokens.cpu())
        return torch.zeros(len(self.window_tokens), dtype=torch.float64).index_add_(
            0, ids, self.token_kld.double()
        )

    @property
    def perplexity(self) -> float | None:
        if not self.ok:
            return None
        return math.exp(self.nll_sum / self.n_tokens)


def partial_result(result: EvalResult, stop: int) -> EvalResult:
    """``result`` restricted to its first ``stop`` windows (the baseline a partial score is paired with)."""
    if stop >= len(result.window_nll):
        return result
    nll, tokens = result.window_nll[:stop], result.window_tokens[:stop]
    n = int(tokens.sum())
    kld, top1 = (None, None) if result.token_kld is None else (result.token_kld[:n], result.same_top1[:n])
    return EvalResult(float(nll.sum()), n, nll, tokens, result.seconds, result.error,
                      split_tokens=result.split_tokens or result.n_tokens, token_kld=kld, same_top1=top1)  # fmt: skip


@dataclass
class _Batch:
    inputs: torch.Tensor  # [B, T] token ids
    positions: torch.Tensor  # [M] flat indices into the [B, T-1] prediction grid of the scored positions
    targets: torch.Tensor  # [M] the token each scored position predicts
    window_ids: torch.Tensor  # [M] which window (global index) each scored token belongs to
    first_window: int


def default_logits_chunk(device: torch.device) -> int:
    """``eval.logits_chunk`` when null: rows of lm_head logits computed at a time. Measured (README "Speed"): GPUs
    prefer fewer, larger matmuls (4096); on 2 CPU cores 512 rows were fastest (1024: +14%, 256: +40% for the head
    of a 49k vocabulary) and keep a chunk's logits and their softmax at 2 x 512 x vocab x 4 bytes."""
    return 4096 if device.type == "cuda" else 512


class Evaluator:
    """Scores a model on fixed token ids with a fixed window protocol; build once, call for every plan."""

    def __init__(
        self,
        ids: torch.Tensor,
        context: int,
        stride: int,
        *,
        batch_size: int = 8,
        dtype: str = "fp32",
        logits_chunk: int | None = None,
        device: str | torch.device | None = "auto",
        compile: bool = False,
        kld: bool = True,
    ):
        if dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"unknown eval.dtype {dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}")
        self.device = resolve_device(device)
        if logits_chunk is None:
            logits_chunk = default_logits_chunk(self.device)
        if batch_size < 1 or logits_chunk < 1:
            raise ConfigError(
                f"eval.batch_size and eval.logits_chunk must be >= 1, got {batch_size}, {logits_chunk}"
            )
        self.dtype = dtype
        self.compile = compile
        self.logits_chunk = logits_chunk
        ids = ids.reshape(-1).to(torch.int64)
        self._ids, self._context, self._stride, self._batch_size = (
            ids,
            context,
            stride,
            batch_size,
        )  # first_tokens
        self.windows = sliding_windows(ids.numel(), context, stride)
        self.window_tokens = torch.tensor([w.n_scored for w in self.windows], dtype=torch.int64)
        self.n_tokens = int(self.window_tokens.sum())
        self._batches = self._make_batches(ids.to(self.device), batch_size)
        self._compiled = None
        self.kld = kld
        self.shared_heads: list = []  # copies of a baseline head (head_copy); a session shares one list
        # per batch: the baseline's hidden states and head (record_reference)
        self._reference: list[Reference] | None = None

    def _make_batches(self, ids: torch.Tensor, batch_size: int) -> list[_Batch]:
        batches: list[_Batch] = []
        i = 0
        while i < len(self.windows):
            length = self.windows[i].end - self.windows[i].begin
            j = i
            while (
                j < len(self.windows)
                and j - i < batch_size
                and self.windows[j].end - self.windows[j].begin == length
            ):
                j += 1
            group = self.windows[i:j]
            inputs = torch.stack([ids[w.begin : w.end] for w in group])  # [B, T]
            # position t predicts token t + 1; the scored positions of a window are its last n_scored ones
            cols = [torch.arange(length - 1 - w.n_scored, length - 1, device=ids.device) for w in group]
            positions = torch.cat([b * (length - 1) + c for b, c in enumerate(cols)])
            targets = inputs[:, 1:].reshape(-1).index_select(0, positions)
            window_ids = torch.cat(
                [
                    torch.full((w.n_scored,), i + b, dtype=torch.int64, device=ids.device)
                    for b, w in enumerate(group)
                ]
            )
            batches.append(_Batch(inputs, positions, targets, window_ids, i))
            i = j
        return batches

    def _scorer(self):
        """The per-batch scoring function, compiled once per evaluator when ``compile`` is set."""
        if self._compiled is None:
            self._compiled = torch.compile(score_batch) if self.compile else score_batch
        return self._compiled

    @torch.inference_mode()
    def evaluate(
        self,
        model: nn.Module,
        stop: int | None = None,
        resume: EvalResult | None = None,
        record_reference: bool = False,
    ) -> EvalResult:
        """Sum of NLL over the scored tokens of ``model`` (already on ``self.device``, weights in fp32).

        ``stop``: score only the first ``stop`` windows (a partial evaluation: a lower fidelity of the split, whose
        result holds those windows only); ``resume``: a partial result of the same model on the first windows, to be
        extended to ``stop`` without scoring them again (racing: qsweep.search.racing). ``record_reference``: keep this
        model's distribution (its hidden states and head) over the whole split as the reference every later evaluation's KL
        divergence is measured against (the baseline's; qsweep.heads)."""
        n = len(self.windows)
        stop = n if stop is None else min(max(1, int(stop)), n)
        first = 0 if resume is None else len(resume.window_nll)
        if first > stop:
            raise ValueError(f"cannot resume a result of {first} windows to {stop}")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        base, head, score = model.base_model, model.get_output_embeddings(), self._scorer()
        window_nll = torch.zeros(stop, dtype=torch.float64, device=self.device)
        if resume is not None:
            window_nll[:first] = resume.window_nll.to(self.device)
        autocast = torch.autocast(
            self.device.type, dtype=COMPUTE_DTYPES[self.dtype], enabled=self.dtype != "fp32"
        )
        finite = resume is None or resume.ok
        record = None
        if self.kld and record_reference and stop == len(self.windows) and first == 0:
            record = self.head_copy(head)
        kld_on = record is not None or (
            self._reference is not None and (resume is None or resume.token_kld is not None)
        )
        recorded, klds, top1s = [], [], []
        for i, b in enumerate(self._batches):
            rows = b.inputs.shape[0]
            if not finite or b.first_window >= stop or b.first_window + rows <= first:
                continue
            inputs, positions, targets, window_ids = _window_range(b, first, stop)
            ref = None
            if kld_on and not record:  # the reference's rows of the windows scored here (contiguous tokens)
                lo = int(self.window_tokens[b.first_window : max(first, b.first_window)].sum())
                ref = self._reference[i].rows(lo, lo + len(targets))
            with autocast:
                out = score(
                    base, head, inputs, positions, targets, self.logits_chunk, record=record, reference=ref
                )
            nll = out[0] if kld_on else out  # [M] fp32
            if record is not None:
                recorded.append(out[1])
            elif kld_on:
                klds.append(out[1].cpu())
                top1s.append(out[2].cpu())
            window_nll.index_add_(0, window_ids, nll.double())
            # A failing plan (int2 everywhere, say) is usually non-finite from its first batch: stop early. Checked
            # only every 8 batches, since each check makes the host wait for the GPU.
            if i % 8 == 0 and not torch.isfinite(window_nll[max(first, b.first_window)]):
                break
        sync()
        seconds = time.perf_counter() - start + (resume.seconds if resume is not None else 0.0)
        window_nll = window_nll.cpu()
        tokens = self.window_tokens[:stop]
        n_tokens = int(tokens.sum())
        total = float(window_nll.sum())
        error = None
        bad = (~torch.isfinite(window_nll)).nonzero()
        if resume is not None and not resume.ok:
            error = resume.error
        elif len(bad):
            error = f"non-finite loss from window {int(bad[0])} of {len(self.windows)}"
        elif total / n_tokens > 700:  # exp() of more overflows a float64
            error = f"perplexity overflows (mean NLL {total / n_tokens:.1f})"
        token_kld = same_top1 = None
        if record is not None and error is None:
            self._reference = recorded
            # the baseline against itself: KL(p || p) = 0, the same top-1 everywhere
            token_kld, same_top1 = torch.zeros(n_tokens), torch.ones(n_tokens, dtype=torch.bool)
        elif kld_on and error is None:
            token_kld, same_top1 = torch.cat(klds), torch.cat(top1s)
            if resume is not None:
                token_kld, same_top1 = (
                    torch.cat([resume.token_kld, token_kld]),
                    torch.cat([resume.same_top1, same_top1]),
                )
        return EvalResult(total, n_tokens, window_nll, tokens, seconds, error, split_tokens=self.n_tokens,
                          token_kld=token_kld, same_top1=same_top1)  # fmt: skip

    def head_copy(self, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A copy of ``head``'s weight and bias (the baseline's, for the KL reference), shared with the evaluators
        ``shared_heads`` links (a session's splits: one copy, not one per split) when their copy is equal."""
        bias = getattr(head, "bias", None)
        for w, b in self.shared_heads:
            if w.shape == head.weight.shape and torch.equal(w, head.weight) and (b is None) == (bias is None):
                return w, b
        copy = (head.weight.detach().clone(), None if bias is None else bias.detach().clone())
        self.shared_heads.append(copy)
        return copy

    def windows_within(self, share: float) -> int:
        """The most windows whose scored tokens are at most ``share`` of the split's (0 when even the first is
        more): how far a partial evaluation may go on that share of one full evaluation."""
        cum = torch.cumsum(self.window_tokens, 0)
        return int((cum <= share * self.n_tokens + 1e-9).sum())

    def first_tokens(self, n: int) -> Evaluator:
        """The same protocol on the first ``n`` token ids only (a cheaper, noisier fidelity of this split)."""
        sub = Evaluator(self._ids[:n], self._context, self._stride, batch_size=self._batch_size, dtype=self.dtype,
                        logits_chunk=self.logits_chunk, device=self.device, compile=self.compile,
                        kld=self.kld)  # fmt: skip
        sub.shared_heads = self.shared_heads  # a KL reference recorded on it shares this one's head copy
        return sub

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    # Per-batch access, for work that keeps state per batch (qsweep.prefix, qsweep.search.sensitivity).
    @property
    def n_batches(self) -> int:
        return len(self._batches)

    def batch_inputs(self, i: int) -> torch.Tensor:
        """The token ids ``[B, T]`` of batch ``i``; :meth:`evaluate` runs the batches in index order."""
        return self._batches[i].inputs

    def batch_rows(self, i: int, max_tokens: int) -> list[tuple[int, int]]:
        """Batch ``i``'s windows in row ranges ``[r0, r1)`` of at most ``max_tokens`` tokens (at least one row)."""
        b, t = self._batches[i].inputs.shape
        step = max(1, max_tokens // t)
        return [(r, min(r + step, b)) for r in range(0, b, step)]

    def batch_nll(self, model: nn.Module, i: int, rows: tuple[int, int] | None = None, *, checkpoint: bool = False,
                  sample_seed: int | None = None) -> torch.Tensor:  # fmt: skip
        """NLL ``[M]`` of batch ``i``'s scored tokens (of its windows ``rows``, all by default), eager and outside
        inference mode (autograd can follow it). ``checkpoint`` recomputes each decoder layer and each chunk of
        logits in the backward pass instead of keeping their activations (same values, far less memory).
        ``sample_seed``: of labels drawn from the model's own distribution instead (qsweep.heads.score_batch)."""
        b = self._batches[i]
        inputs, positions, targets = b.inputs, b.positions, b.targets
        if rows is not None:  # the same restriction as a partial evaluation's, by window index
            inputs, positions, targets, _ = _window_range(
                b, b.first_window + rows[0], b.first_window + rows[1]
            )
        fast = self.dtype != "fp32"
        with torch.autocast(self.device.type, dtype=COMPUTE_DTYPES[self.dtype], enabled=fast):
            head = model.get_output_embeddings()
            if not checkpoint:
                return score_batch(model.base_model, head, inputs, positions, targets, self.logits_chunk,
                                   sample_seed=sample_seed)  # fmt: skip
            with checkpointed_layers(model):
                return score_batch(model.base_model, head, inputs, positions, targets, self.logits_chunk,
                                   checkpoint=True, sample_seed=sample_seed)  # fmt: skip


def _window_range(b: _Batch, first: int, stop: int):
    """Batch ``b``'s inputs, scored positions, targets and window ids restricted to windows ``[first, stop)``."""
    rows = b.inputs.shape[0]
    lo, hi = max(0, first - b.first_window), min(rows, stop - b.first_window)
    if (lo, hi) == (0, rows):
        return b.inputs, b.positions, b.targets, b.window_ids
    per_row = b.inputs.shape[1] - 1
    keep = (b.positions >= lo * per_row) & (b.positions < hi * per_row)
    return b.inputs[lo:hi], b.positions[keep] - lo * per_row, b.targets[keep], b.window_ids[keep]
