"""The lm_head end of an evaluation: the hidden states of the scored positions through the head, a chunk of rows at a
time, to per-token NLL and, against a reference distribution, per-token KL divergence and top-1 agreement.

**KL divergence** (llama.cpp's ``llama-perplexity --kl-divergence``: KL(baseline || plan) per token, its mean,
median, 99th and 99.9th percentiles, and "same top p", the share of tokens whose top-1 token is unchanged), exact.
The baseline's full distribution is ``vocab`` floats per scored token (1 GiB on the bundled model's validation
split; 32 GiB at a 128k vocabulary and 64k tokens), and a top-k summary of it is not enough: with the rest of the
vocabulary merged into one tail bin, KL is a lower bound that, on the bundled model (vocabulary 8,192, 2,048 tokens;
plans q8_0, q4_0, int3_g128), falls 22% short of the exact mean at k = 32, 10% at 128, 3% at 512 and 0.5% at 2,048
(it would need 64 MiB a thousand tokens). So the baseline pass keeps what its distribution is computed from: each
scored token's final hidden state (``d`` values, in the head's dtype: 512 bytes a token on the bundled model, 8 KiB
on a 4,096-wide one) and a copy of the baseline's lm_head; a plan's evaluation recomputes the baseline's logits
chunk by chunk beside its own (one more head matmul per chunk) and takes the exact KL.

Floor: the KL is taken from two float32 log-softmaxes, whose log-sum-exp terms are each rounded by about 2e-7, so a
token's KL below about 1e-7 nats is rounding (kept >= 0 by the clamp): on a tiny random GPT-2 (tests), an INT8
per-channel attention unit measures 8e-8 per token where its second-order value is 6e-10. Quantized plans worth
comparing sit far above it (q8_0 on the bundled model: 1.2e-4). Under ``eval.dtype=bf16`` the forward pass's own
rounding adds a few 1e-4: uniform int8 on the bundled model (4,096 validation tokens) measures 1.1e-3 in bf16 and
7.8e-4 in fp32, so compare small KLs in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Reference", "checkpointed_layers", "kld_summary", "mean_kld", "score_batch"]


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module):
    """Activation checkpointing of every decoder layer (transformers' GradientCheckpointingLayer) for one forward,
    without switching the model to training mode: only the layers' own ``training`` flag is set (their dropout
    children stay in eval mode, so the values are unchanged)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers without it: no checkpointing, more memory
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    saved = [(m.training, m.__dict__.get("gradient_checkpointing"), m.__dict__.get("_gradient_checkpointing_func"))
             for m in layers]  # fmt: skip
    try:
        for m in layers:
            m.training, m.gradient_checkpointing = True, True
            m._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        yield
    finally:
        for m, (training, flag, func) in zip(layers, saved, strict=True):
            m.training = training
            for key, value in (("gradient_checkpointing", flag), ("_gradient_checkpointing_func", func)):
                if value is None:
                    m.__dict__.pop(key, None)
                else:
                    setattr(m, key, value)


@dataclass
class Reference:
    """The baseline over the scored tokens of one batch: their final hidden states and the baseline's lm_head."""

    hidden: torch.Tensor  # [M, d], the head's dtype
    weight: torch.Tensor  # [vocab, d], the baseline's lm_head (shared by every batch)
    bias: torch.Tensor | None

    def rows(self, lo: int, hi: int) -> Reference:
        return Reference(self.hidden[lo:hi], self.weight, self.bias)

    def logits(self) -> torch.Tensor:
        return F.linear(self.hidden, self.weight, self.bias).float()


def score_batch(
    base: nn.Module,
    head: nn.Module,
    inputs: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    checkpoint: bool = False,
    record: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    reference: Reference | None = None,
    sample_seed: int | None = None,
):
    """NLL of each scored token of a batch of windows: ``inputs`` [B, T] -> [M] (fp32).

    ``sample_seed``: the NLL of labels drawn from the model's own distribution instead of ``targets`` (each chunk's
    from a generator seeded ``sample_seed + first row``, so a recomputed chunk draws the same labels): the gradients
    whose squares estimate the model's Fisher information, the curvature of KL(model || perturbed model)
    (qsweep.search.sensitivity's KL proxy).

    Only the hidden states of the M scored positions reach the lm_head, ``chunk`` rows at a time, so at most
    [chunk, vocab] logits exist at once (under autograd too with ``checkpoint``: each chunk's logits are
    recomputed in the backward pass instead of kept). ``record``: a copy of the baseline's head ``(weight, bias)``;
    also the batch's :class:`Reference` (its hidden states and that copy), returned as ``(nll, reference)``; ``reference``: also per-token KL(reference || model) and top-1 agreement, returned as
    ``(nll, kld [M] fp32, same_top1 [M] bool)``.
    """
    hidden = base(input_ids=inputs, use_cache=False).last_hidden_state  # [B, T, d]
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [M, d]
    if record is not None:
        # the baseline's own pass: its hidden states (and the head copy given) are the reference
        ref = Reference(hidden.detach().clone(), *record)
    out = []
    for k in range(0, hidden.shape[0], chunk):
        h, t = hidden[k : k + chunk], targets[k : k + chunk]
        if sample_seed is not None:
            t = sample_seed + k
        if checkpoint:
            from torch.utils.checkpoint import checkpoint as recompute

            out.append(recompute(_chunk_nll, head, h, t, use_reentrant=False))
        elif reference is not None:
            out.append(_chunk_kld(head, h, t, reference.rows(k, k + chunk)))
        else:
            out.append(_chunk_nll(head, h, t))
    if record is not None:
        return torch.cat(out), ref
    if reference is None or checkpoint:
        return torch.cat(out)
    return tuple(torch.cat(p) for p in zip(*out, strict=True))


def _chunk_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor | int) -> torch.Tensor:
    """The chunk's NLL of ``targets``, or (an int) of labels drawn from its own softmax with that seed."""
    logits = head(hidden).float()  # [chunk, vocab]
    if isinstance(targets, int):
        with torch.no_grad():
            gen = torch.Generator(device=logits.device).manual_seed(targets)
            targets = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
    return F.cross_entropy(logits, targets, reduction="none")


def _chunk_kld(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, reference: Reference) -> tuple:
    """One chunk's NLL (the values :func:`_chunk_nll` gives: cross-entropy is this log-softmax's negated target
    entry), its exact KL(baseline || model) per token and whether its top-1 token is the baseline's. Three
    ``[chunk, vocab]`` buffers at most, reused in place."""
    logq = F.log_softmax(head(hidden).float(), dim=-1)
    nll = -logq.gather(1, targets[:, None]).squeeze(1)
    logp = reference.logits()
    same = logq.argmax(-1) == logp.argmax(-1)
    logp = F.log_softmax(logp, dim=-1)
    diff = logq.neg_().add_(logp)  # log p - log q, in logq's buffer
    # rounding leaves -1e-9 where the two agree
    kld = torch.einsum("ij,ij->i", logp.exp_(), diff).clamp_min(0)
    return nll, kld, same


def kld_summary(token_kld: torch.Tensor | None, same_top1: torch.Tensor | None) -> dict:
    """The record's KL fields: mean, median, 99th and 99.9th percentile of the per-token KL (nats) and the share of
    tokens whose top-1 token is the baseline's; None each without a reference."""
    keys = ("kld_mean", "kld_median", "kld_p99", "kld_p999", "top1_agreement")
    if token_kld is None or same_top1 is None or not len(token_kld):
        return dict.fromkeys(keys)
    q = np.percentile(token_kld.double().numpy(), [50, 99, 99.9])
    return dict(
        zip(keys, (mean_kld(token_kld), *map(float, q), float(same_top1.double().mean())), strict=True)
    )


def mean_kld(token_kld: torch.Tensor) -> float:
    """The mean per-token KL (the record's ``kld_mean``), in float64."""
    return float(token_kld.double().numpy().mean())
