"""Benchmark: seconds per full perplexity evaluation and per plan switch; prints a Markdown table.

    python -m qsweep.bench.evaluate                       # GPU if present: GPT-2 small random-init, 287,744 tokens
    python -m qsweep.bench.evaluate --device cpu --tokens 16384 --n-layer 12

Rows:
  * ``seed loop``: the seed's style, one window at a time through the HF model with ``labels`` (full logits, HF
    loss), fp32;
  * ``qsweep``: :class:`qsweep.evaluate.Evaluator` (batched, chunked lm_head + cross-entropy), per compute dtype,
    with and without ``torch.compile``;
  * ``plan switch``: :class:`qsweep.apply.PlanApplier` moving between two GPT-2 plans, first time (quantizes and
    fills the cache) and cached (copies only).
Each timing is the best of ``--repeats`` after one warm-up.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from qsweep.apply import PlanApplier
from qsweep.evaluate import Evaluator, resolve_device, sliding_windows
from qsweep.model import unit_table
from qsweep.paths import config_dir
from qsweep.plan import named_plan_spec, plan_from_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int):
    fn()  # warm-up (cuDNN/cuBLAS heuristics, compilation)
    best, out = math.inf, None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


@torch.inference_mode()
def seed_loop(model, ids: torch.Tensor, context: int, stride: int) -> float:
    """The seed's evaluator shape: one window at a time, HF forward with labels; returns perplexity."""
    nll, n = 0.0, 0
    for w in sliding_windows(ids.numel(), context, stride):
        inp = ids[w.begin : w.end].unsqueeze(0)
        labels = inp.clone()
        labels[:, : inp.shape[1] - w.n_scored] = -100
        loss = model(inp, labels=labels).loss  # mean over the n_scored shifted labels
        nll += loss.double().item() * w.n_scored
        n += w.n_scored
    return math.exp(nll / n)


def main(argv: list[str] | None = None) -> None:
    import yaml
    from transformers import GPT2Config, GPT2LMHeadModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=287_744)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--compile", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--skip-seed-loop", action="store_true")
    ap.add_argument(
        "--profile", action="store_true", help="also print the top kernels of one evaluation per dtype"
    )
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, attn_implementation="sdpa")).to(device).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0)
    )
    ids_dev = ids.to(device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    n_windows = len(sliding_windows(args.tokens, args.context, args.context))
    print(
        f"# qsweep evaluator benchmark: {name}, torch {torch.__version__}, GPT-2 ({args.n_layer} blocks) random-init, "
        f"{args.tokens:,} tokens in {n_windows} windows of {args.context}, batch {args.batch_size}\n"
    )
    rows = []
    if not args.skip_seed_loop:
        sec, ppl = _timed(
            lambda: seed_loop(model, ids_dev, args.context, args.context), device, max(1, args.repeats - 2)
        )
        rows.append(("seed loop (1 window at a time, HF loss)", "fp32", "no", sec, ppl))
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    for dtype in args.dtypes.split(","):
        for comp in compiles:
            ev = Evaluator(ids, args.context, args.context, batch_size=args.batch_size, dtype=dtype, device=device,
                           compile=comp)  # fmt: skip
            sec, res = _timed(lambda ev=ev: ev.evaluate(model), device, args.repeats)
            rows.append(("qsweep Evaluator", dtype, "yes" if comp else "no", sec, res.perplexity))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for dtype in args.dtypes.split(","):
            ev = Evaluator(
                ids, args.context, args.context, batch_size=args.batch_size, dtype=dtype, device=device
            )
            ev.evaluate(model)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                ev.evaluate(model)
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(
                f"\n## profile: {dtype}\n{prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60)}"
            )
    print("| method | dtype | compile | seconds / evaluation | tokens / s | perplexity |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, dtype, comp, sec, ppl in rows:
        print(f"| {method} | {dtype} | {comp} | {sec:.3f} | {args.tokens / sec:,.0f} | {ppl:.4f} |")

    # plan switching on the same model
    table = unit_table(model, yaml.safe_load((config_dir() / "model" / "gpt2.yaml").read_text()))
    plans = [plan_from_config(named_plan_spec(p), table) for p in ("attn0_mlp123", "int8")]
    plans.append(
        plan_from_config({"default": "int4_g128", "rules": [{"pattern": ".*ln.*", "format": "fp32"}]}, table)
    )
    applier = PlanApplier(model, table)
    print("\n| plan switch | milliseconds |")
    print("| --- | --- |")
    for label, plan in [("first apply (quantize + cache): champion", plans[0]), ("first apply: int8", plans[1]),
                        ("first apply: int4_g128", plans[2])]:  # fmt: skip
        _sync(device)
        t = time.perf_counter()
        applier.apply_(plan)
        _sync(device)
        print(f"| {label} | {1e3 * (time.perf_counter() - t):.1f} |")
    best = math.inf
    for i in range(10):
        _sync(device)
        t = time.perf_counter()
        applier.apply_(plans[i % 3])
        _sync(device)
        best = min(best, time.perf_counter() - t)
    print(f"| cached switch (best of 10, weights of most units change) | {1e3 * best:.2f} |")


if __name__ == "__main__":
    main()
