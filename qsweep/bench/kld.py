"""Benchmark: qsweep's KL divergence against llama.cpp's own, for the same plans as GGUF files on the same tokens.

    python -m qsweep.bench.kld --plans q8_0,q6_K,q5_K,q4_K,q4_0,q3_K,q2_K [--split test] [overrides]

For each plan (uniform over the model's units; ``--plan-file`` adds one from a file, e.g. a search's
``best_plan.yaml``), qsweep scores it on the split (perplexity ratio, per-token KL(baseline || plan): mean and
99.9th percentile, same top-1: ``qsweep.heads``), then writes it and the baseline plan as GGUF files
(``qsweep.export.gguf``) and has llama.cpp compute the same quantities from the two files' logits on the same
windows (``qsweep.export.runtime.gguf_perplexity`` with a reference: ``llama-perplexity --kl-divergence``'s
definitions). Needs the export extra (gguf-py, llama-cpp-python). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qsweep.errors import one_line_errors
from qsweep.heads import kld_summary

__all__ = ["main"]


@one_line_errors("qsweep.bench.kld")
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", default="q8_0,q6_K,q5_K,q4_K,q4_0,q3_K,q2_K")
    ap.add_argument("--plan-file", action="append", default=[], help="a plan file to add (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: CPUs, at most 8)")
    ap.add_argument(
        "overrides", nargs="*", help="Hydra overrides (default model=tiny data=tiny eval.device=cpu)"
    )
    args = ap.parse_args(argv)

    from qsweep.config import compose_config
    from qsweep.data import load_token_ids
    from qsweep.export.gguf import write_gguf
    from qsweep.export.runtime import gguf_perplexity
    from qsweep.plan import Plan, load_plan_file
    from qsweep.session import EvalSession

    session = EvalSession(compose_config(["model=tiny", "data=tiny", "eval.device=cpu", *args.overrides]))
    plans = {name: Plan.uniform(session.table, name) for name in args.plans.split(",") if name}
    plans.update({Path(f).name: load_plan_file(f, session.table) for f in args.plan_file})
    ids = load_token_ids(session.data_cfg, args.split, session.tokenizer)  # what the evaluator scores
    if session.eval_cfg.get("max_tokens") is not None:
        ids = ids[: int(session.eval_cfg["max_tokens"])]
    stride = session.eval_cfg.get("stride") or session.context
    base = session.baseline(args.split)
    print(f"# {session.model_cfg.get('name')}, split {args.split!r} ({base.n_tokens} scored tokens), baseline "
          f"{session.baseline_plan.digest()} ({dict(sorted(session.baseline_plan.histogram(session.table).items()))})")  # fmt: skip
    print("\n| plan | packed MB | ppl ratio (qsweep / llama.cpp) | mean KLD (qsweep / llama.cpp) "
          "| 99.9% KLD (qsweep / llama.cpp) | same top-1 (qsweep / llama.cpp) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="qsweep-kld-") as tmp:
        session.applier.restore_()
        reference = write_gguf(session.model, session.tokenizer, session.table, session.baseline_plan,
                               Path(tmp) / "baseline.gguf").path  # fmt: skip
        ref_run = gguf_perplexity(reference, ids, session.context, int(stride), threads=args.threads)
        for name, plan in plans.items():
            ours = session.score(plan, args.split).record()
            session.applier.restore_()
            path = write_gguf(
                session.model, session.tokenizer, session.table, plan, Path(tmp) / f"{name}.gguf"
            ).path
            run = gguf_perplexity(
                path, ids, session.context, int(stride), threads=args.threads, reference=reference
            )
            theirs = kld_summary(run.token_kld, run.same_top1)
            print(f"| {name} | {ours['packed_size_bytes'] / 1e6:.3f} | {ours['ppl_ratio']:.4f} / "
                  f"{run.perplexity / ref_run.perplexity:.4f} | {ours['kld_mean']:.5f} / {theirs['kld_mean']:.5f} | "
                  f"{ours['kld_p999']:.4f} / {theirs['kld_p999']:.4f} | {100 * ours['top1_agreement']:.2f}% / "
                  f"{100 * theirs['top1_agreement']:.2f}% |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
