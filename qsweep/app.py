"""What `python -m qsweep` does once Hydra has composed the config: evaluate one plan, or run a search."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from qsweep.session import EvalSession

__all__ = ["evaluate_one"]

log = logging.getLogger("qsweep")


def evaluate_one(cfg: DictConfig, out_dir: Path) -> dict:
    """Score cfg.plan (or cfg.plan_file) against cfg.baseline on one split; write results.json; return the row."""
    session = EvalSession(cfg)
    plan = session.resolve_plan(cfg.plan, cfg.plan_file)
    split = cfg.split or cfg.eval.report_split
    ev = session.evaluator(split)
    log.info(
        "model %s (%d units, %s), split %r: %d tokens in %d windows (eval=%s: context %d, stride %s), device %s",
        session.model_cfg.get("path") or session.model_cfg.get("name"), len(session.table),
        session.model_cfg["granularity"], split, ev.n_tokens, len(ev.windows), cfg.eval.name, session.context,
        cfg.eval.stride or session.context, session.device,
    )  # fmt: skip
    score = session.score(plan, split)
    row = {**score.to_dict(), "plan": plan.to_dict()["units"], "eval": cfg.eval.name, "data": cfg.data.name}
    (out_dir / "results.json").write_text(json.dumps(row, indent=2) + "\n")
    plan.save(out_dir / "plan.yaml")
    if score.result.ok:
        log.info("perplexity %.4f vs baseline %.4f (%+.3f%%), %.3fx, fitness %.4f; wrote %s",
                 score.perplexity, score.baseline_perplexity, 100 * score.degradation, score.compression,
                 score.fitness, out_dir / "results.json")  # fmt: skip
    else:
        log.error("evaluation failed: %s", score.result.error)
    return row
