"""The fast evaluator against a plain one-window-at-a-time reference, window semantics, failures, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import model_cfg, tiny_model

from qsweep.apply import apply_plan_
from qsweep.evaluate import Evaluator, sliding_windows
from qsweep.metrics import degradation, paired_degradation_ci
from qsweep.model import unit_table
from qsweep.plan import Plan


def reference_perplexity(
    model, ids: torch.Tensor, context: int, stride: int
) -> tuple[float, int, list[float]]:
    """The HF guide's loop written for clarity: full logits, one window at a time, label shift by hand.

    Returns the perplexity, the number of scored tokens and the NLL of each window that scores a token.
    """
    nll_sum, n_scored, prev_end, per_window = 0.0, 0, 0, []
    n = ids.numel()
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        window = ids[begin:end].unsqueeze(0)
        with torch.no_grad():
            logits = model(window).logits[0].float()  # [T, vocab]
        logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t + 1
        targets = window[0, 1:]
        token_nll = -logp.gather(1, targets[:, None])[:, 0]
        k = min(trg_len, end - begin - 1)
        if k > 0:
            per_window.append(token_nll[-k:].double().sum().item())
            nll_sum += per_window[-1]
            n_scored += k
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / n_scored), n_scored, per_window


# (n_tokens, context, stride): stride == context, overlapping, a tail shorter than the stride, a tail of one token
PROTOCOLS = [(200, 32, 32), (200, 32, 16), (203, 32, 24), (161, 40, 40), (97, 64, 8)]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
@pytest.mark.parametrize(("n", "context", "stride"), PROTOCOLS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_fast_path_matches_reference(arch, n, context, stride, batch_size):
    model = tiny_model(arch)
    ids = torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n))
    ref_ppl, ref_n, ref_windows = reference_perplexity(model, ids, context, stride)
    ev = Evaluator(ids, context, stride, batch_size=batch_size, logits_chunk=37, device="cpu")
    res = ev.evaluate(model)
    assert res.ok and res.n_tokens == ref_n
    assert res.perplexity == pytest.approx(ref_ppl, rel=1e-6)
    # the per-window NLL the paired CI is built from: each window's own tokens, in order
    assert res.window_nll.tolist() == pytest.approx(ref_windows, rel=1e-6)
    assert res.nll_sum == pytest.approx(float(res.window_nll.sum()), rel=1e-12)


@pytest.mark.parametrize(("n", "context", "stride"), [*PROTOCOLS, (1000, 256, 128), (2048, 1024, 1024)])
def test_every_token_after_the_first_scored_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = []
    for w in windows:
        targets = range(w.begin + 1, w.end)  # token positions a window can predict
        scored += list(targets)[-w.n_scored :]
        assert w.end - w.begin <= context
    if stride == context:
        # the first token of every window is unscored (GPTQ protocol); a 1-token tail window scores nothing
        assert len(scored) == n - math.ceil(n / context)
    else:
        assert sorted(scored) == list(range(1, n))
    assert len(scored) == len(set(scored))


def test_window_context_at_least_context_minus_stride():
    for w in sliding_windows(1000, 256, 128)[1:]:
        first_scored = w.end - w.n_scored
        assert first_scored - w.begin >= 256 - 128


@pytest.mark.parametrize(("args", "message"), [
    ((100, 1, 1), "eval.context must be >= 2"),
    ((100, 32, 0), r"eval.stride must be in \[1, context=32\], got 0"),
    ((100, 32, 33), r"eval.stride must be in \[1, context=32\], got 33"),
    ((1, 32, 32), "need at least 2 tokens"),
])  # fmt: skip
def test_bad_protocols(args, message):
    with pytest.raises(ValueError, match=message):
        sliding_windows(*args)


def test_nan_loss_is_a_failed_evaluation_not_a_crash():
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    res = Evaluator(torch.arange(100) % 101, 32, 32, device="cpu").evaluate(model)
    assert not res.ok and "non-finite loss" in res.error
    assert res.perplexity is None


def test_overflowing_perplexity_is_a_failed_evaluation_not_a_crash():
    # finite weights and a finite loss, but a mean NLL of thousands of nats: exp() of it overflows a float64
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1e5)  # logits 1e5 times larger
    res = Evaluator(torch.arange(100) % 101, 32, 32, device="cpu").evaluate(model)
    assert torch.isfinite(res.window_nll).all() and res.nll_sum / res.n_tokens > 710
    assert not res.ok and res.error.startswith("perplexity overflows (mean NLL")
    assert res.perplexity is None


def test_paired_ci_on_real_evaluations():
    model = tiny_model("gpt2")
    table = unit_table(model, model_cfg("gpt2"))
    ids = torch.randint(0, 101, (2000,), generator=torch.Generator().manual_seed(0))
    ev, short = Evaluator(ids, 32, 32, device="cpu"), Evaluator(ids[:400], 32, 32, device="cpu")
    base, base_short = ev.evaluate(model), short.evaluate(model)
    apply_plan_(model, Plan.uniform(table, "int3"), table)
    plan, plan_short = ev.evaluate(model), short.evaluate(model)
    lo, hi = paired_degradation_ci(plan, base)
    # the interval is centred (in log space) on this plan's degradation vs this baseline, not the reverse
    d = degradation(plan.perplexity, base.perplexity)
    assert d != 0 and math.sqrt((1 + lo) * (1 + hi)) - 1 == pytest.approx(d, rel=1e-9)
    lo2, hi2 = paired_degradation_ci(plan_short, base_short)
    assert hi2 - lo2 > 1.5 * (hi - lo) > 0  # 5x fewer windows: sqrt(5) wider and a larger t quantile
    with pytest.raises(ValueError, match="same windows"):
        paired_degradation_ci(plan, base_short)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("stops", [(1, 7), (4, 5, 11), (3, 13)])
def test_a_partial_evaluation_is_the_full_ones_first_windows_and_resumes_without_rescoring(arch, stops):
    """Racing's fidelities (issue 19): the first k windows of a full evaluation, split mid-batch too (batch 3), and
    a resumed evaluation ends exactly where one straight run does."""
    model = tiny_model(arch)
    ids = torch.randint(0, 101, (400,), generator=torch.Generator().manual_seed(1))
    ev = Evaluator(ids, 32, 24, batch_size=3, logits_chunk=37, device="cpu")
    full = ev.evaluate(model)
    assert ev.n_windows == len(full.window_nll) == 17 and full.share == 1.0
    part = None
    for k in stops:
        part = ev.evaluate(model, stop=k, resume=part)
        assert len(part.window_nll) == k and part.n_tokens == int(ev.window_tokens[:k].sum())
        assert part.window_nll.tolist() == pytest.approx(full.window_nll[:k].tolist(), rel=1e-6)
        assert part.share == pytest.approx(part.n_tokens / full.n_tokens)
    rest = ev.evaluate(model, resume=part)
    assert rest.window_nll.tolist() == pytest.approx(full.window_nll.tolist(), rel=1e-6)
    assert ev.windows_within(1.0) == 17 and ev.windows_within(0.0) == 0
    k = ev.windows_within(0.5)
    assert ev.window_tokens[:k].sum() <= 0.5 * full.n_tokens < ev.window_tokens[: k + 1].sum()
    with pytest.raises(ValueError, match="cannot resume"):
        ev.evaluate(model, stop=2, resume=part)


def _exact_kld(base, plan_model, ev: Evaluator):
    """KL(base || plan) and same top-1, per scored token in the evaluator's order, from full distributions."""
    klds, same = [], []
    with torch.inference_mode():
        for w in ev.windows:
            ids = ev._ids[w.begin : w.end][None]
            lp, lq = (
                torch.log_softmax(m(ids).logits[0, :-1].float(), -1)[-w.n_scored :]
                for m in (base, plan_model)
            )
            klds.append((lp.exp() * (lp - lq)).sum(-1))
            same.append(lp.argmax(-1) == lq.argmax(-1))
    return torch.cat(klds), torch.cat(same)


@pytest.mark.parametrize(
    "plan_name",
    [pytest.param("q8_0", marks=pytest.mark.slow), "q4_0", pytest.param("int3_g128", marks=pytest.mark.slow)],
)
def test_kl_divergence_is_the_exact_one_of_full_distributions(plan_name):
    """The bundled model (vocabulary 8,192), 2,048 tokens of its corpus: per-token KL(baseline || plan) and top-1
    agreement equal those of the two models' full distributions (computed here one window at a time); the baseline
    against itself is 0; the NLL is unchanged by computing them."""
    import copy
    from pydoc_data.topics import topics

    from conftest import ROOT

    from qsweep.model import load_model, load_tokenizer

    cfg = model_cfg("gpt2", path=str(ROOT / "qsweep" / "assets" / "tiny"))
    base = load_model(cfg)
    table = unit_table(base, cfg)
    text = "\n\n".join(topics[k] for k in sorted(topics)[:30])
    ids = torch.tensor(load_tokenizer(cfg)(text)["input_ids"][:2048])
    ev = Evaluator(ids, 256, 256, device="cpu", kld=True)
    ref = ev.evaluate(base, record_reference=True)
    assert torch.equal(ref.token_kld, torch.zeros(ref.n_tokens)) and bool(ref.same_top1.all())
    plan_model = apply_plan_(copy.deepcopy(base), Plan.uniform(table, plan_name), table)
    got = ev.evaluate(plan_model)
    exact, same = _exact_kld(base, plan_model, ev)
    assert got.token_kld.shape == exact.shape == (ref.n_tokens,)
    assert got.token_kld.tolist() == pytest.approx(exact.tolist(), rel=1e-3, abs=1e-6)
    assert torch.equal(got.same_top1, same)
    plain = Evaluator(ids, 256, 256, device="cpu", kld=False).evaluate(plan_model)
    assert plain.token_kld is None and torch.equal(plain.window_nll, got.window_nll)


def test_kl_divergence_of_a_partial_evaluation_is_the_full_ones_first_tokens():
    """Racing's partial evaluations and resumes carry the per-token KL of exactly the windows they scored."""
    model = tiny_model("gpt2")
    other = tiny_model("gpt2", seed=1)
    ids = torch.randint(0, 101, (400,), generator=torch.Generator().manual_seed(1))
    ev = Evaluator(ids, 32, 24, batch_size=3, logits_chunk=37, device="cpu", kld=True)
    ev.evaluate(model, record_reference=True)
    full = ev.evaluate(other)
    part = ev.evaluate(other, stop=4)
    assert part.token_kld.tolist() == pytest.approx(
        full.token_kld[: part.n_tokens].tolist(), rel=1e-5, abs=1e-7
    )
    rest = ev.evaluate(other, resume=ev.evaluate(other, stop=5))
    assert rest.token_kld.tolist() == pytest.approx(full.token_kld.tolist(), rel=1e-5, abs=1e-7)
    assert torch.equal(rest.same_top1, full.same_top1) and len(full.token_kld) == full.n_tokens
