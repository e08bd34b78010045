"""`python -m qsweep +export=gguf|compressed plan=... export.path=DIR`: export one plan and prove it.

Steps (each a function of qsweep.export; this module only strings them together and returns the record):
  1. the plan (``plan=NAME`` or ``plan_file=PATH``, e.g. a search's ``best_plan.yaml``) is resolved and checked
     against the target's formats: a unit the target cannot store is refused in one line, before anything is
     written;
  2. the export is written from the original fp32 weights (GGUF file / compressed-tensors directory);
  3. it is read back through qsweep (checksum checked) and every unit's dequantized tensors are compared with
     qsweep's fake-quantized weights: they must be identical;
  4. qsweep's simulated perplexity and the real runtime's (``export.runtime``: llama-cpp-python on the GGUF,
     transformers on the compressed-tensors checkpoint) are measured on the same windows of ``export.split``.
The record (sizes vs prediction, both perplexities, their relative difference and whether it is within
``export.tolerance``) is written to ``export.json`` in the run directory and returned (printed as one JSON line).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qsweep.data import load_token_ids
from qsweep.errors import ConfigError
from qsweep.export.common import ExportError, check_destination, verify_tensors
from qsweep.export.runtime import RuntimeCheckFailed
from qsweep.session import EvalSession

__all__ = ["EXPORT_KEYS", "TARGETS", "export_one"]

log = logging.getLogger("qsweep")
TARGETS = ("gguf", "compressed", "recipe")
EXPORT_KEYS = {"target", "path", "runtime", "split", "threads", "tolerance", "kv_f32", "overwrite"}


def _export_config(cfg: DictConfig) -> dict:
    raw = OmegaConf.to_container(cfg.export, resolve=True)
    unknown = sorted(set(raw) - EXPORT_KEYS)
    if unknown:
        raise ConfigError(f"unknown key export.{unknown[0]}; valid keys: {', '.join(sorted(EXPORT_KEYS))}")
    if raw.get("target") not in TARGETS:
        raise ConfigError(f"unknown export.target {raw.get('target')!r}; valid: {', '.join(TARGETS)}")
    if cfg.get("search") is not None:
        raise ConfigError(
            "+export and +search in one run: run the search, then export its plan with "
            "+export=... plan_file=<run dir>/best_plan.yaml"
        )
    return raw


def _split_ids(session: EvalSession, split: str):
    """The token ids the session's evaluator of ``split`` scores (same corpus, tokenizer and eval.max_tokens)."""
    ids = load_token_ids(session.data_cfg, split, session.tokenizer)
    max_tokens = session.eval_cfg.get("max_tokens")
    return ids[: int(max_tokens)] if max_tokens is not None else ids


def export_one(cfg: DictConfig, out_dir: Path) -> dict:
    """Export cfg.plan / cfg.plan_file to cfg.export.target, verify it, measure it; write export.json; the record."""
    ecfg = _export_config(cfg)
    target = ecfg["target"]
    dest = check_destination(ecfg.get("path") or out_dir)  # before the model loads
    if target == "recipe":
        return _export_recipe(cfg, ecfg, dest, out_dir)
    session = EvalSession(cfg)
    plan = session.resolve_plan(cfg.plan, cfg.plan_file)
    name = f"model-{plan.digest()}.gguf" if target == "gguf" else f"compressed-{plan.digest()}"
    path = _new_path(dest / name, ecfg)
    session.applier.restore_()  # the writers start from the original fp32 weights
    log.info("export: writing %s (%d units) to %s", target, len(session.table), dest)
    if target == "gguf":
        from qsweep.export.gguf import read_gguf, write_gguf

        result = write_gguf(session.model, session.tokenizer, session.table, plan, path)
        exported = read_gguf(result.path).tensors
        runtime_model = None  # llama.cpp loads the file itself
    else:
        from qsweep.export.compressed import read_compressed, write_compressed

        result = write_compressed(session.model, session.tokenizer, session.table, plan, path)
        runtime_model, _ = read_compressed(result.path)
        exported = dict(runtime_model.named_parameters())
    expected = {
        p.name: session.applier.quantized(p.name, p.channel_dim, plan[u.name])
        for u in session.table
        for p in u.params
    }
    diffs = verify_tensors(expected, exported, session.table)
    mismatched = [u for u, d in diffs.items() if d != 0.0]
    if mismatched:  # a bug in a writer, not a user error
        raise RuntimeError(
            f"exported tensors differ from qsweep's fake-quantized weights in units {mismatched}"
        )
    log.info("wrote %s: %d units verified bit-identical to the simulated weights; tensor data %d bytes = predicted "
             "%d + widened %d; file %d bytes", result.path, len(diffs), result.tensor_bytes, result.predicted_bytes,
             result.widened_bytes, result.file_bytes)  # fmt: skip
    split = ecfg.get("split") or cfg.eval.report_split
    log.info("export: scoring the simulated plan on %r", split)
    score = session.score(plan, split)
    row = {
        **result.record(),
        "units_verified": len(diffs),
        "split": split,
        "eval_tokens": score.result.n_tokens,
        "simulated_perplexity": score.perplexity,
        "baseline_perplexity": score.baseline_perplexity,
        "runtime": None,
        "runtime_perplexity": None,
        "runtime_relative_difference": None,
        "tolerance": ecfg.get("tolerance"),
        "within_tolerance": None,
    }
    if ecfg.get("runtime", True):
        try:
            _measure_runtime(row, session, score, result, runtime_model, ecfg)
        except (
            RuntimeCheckFailed
        ) as e:  # the export is written and verified: keep it, record why it is unmeasured
            row["error"] = str(e)
            log.error("%s", e)
    (out_dir / "export.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def _new_path(path: Path, ecfg: dict) -> Path:
    if path.exists() and not ecfg.get("overwrite"):
        raise ExportError(f"{path} exists (this plan was exported there before): pass export.overwrite=true to "
                          "replace it, or another export.path")  # fmt: skip
    return path


def _export_recipe(cfg: DictConfig, ecfg: dict, dest: Path, out_dir: Path) -> dict:
    """The plan as a llama-quantize recipe (qsweep.export.recipe), from the model's config alone: the model is built
    on the meta device (names and shapes, no weights), so a recipe for a 70B model needs no memory for it."""
    from qsweep.export.recipe import write_recipe
    from qsweep.model import load_model_config, meta_model, unit_table
    from qsweep.plan import load_plan_file, plan_from_config

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = meta_model(load_model_config(model_cfg))
    table = unit_table(model, model_cfg)
    if cfg.plan_file:
        plan = load_plan_file(cfg.plan_file, table)
    else:
        plan = plan_from_config(OmegaConf.to_container(cfg.plan, resolve=True), table)
    path = _new_path(dest / f"recipe-{plan.digest()}.txt", ecfg)
    row = write_recipe(model, table, plan, path).record()
    log.info("wrote %s: %d tensor types; apply it with: %s", path, row["tensors"], row["command"])
    for tensor, why in row["kept"].items():
        log.warning("recipe: %s: %s", tensor, why)
    (out_dir / "export.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def _measure_runtime(row: dict, session: EvalSession, score, result, runtime_model, ecfg: dict) -> None:
    """The real runtime's perplexity on the windows ``score`` was measured on, into ``row``."""
    split = row["split"]
    log.info("export: measuring the exported model's perplexity on %r in its runtime", split)
    if runtime_model is None:
        from qsweep.export.runtime import gguf_perplexity

        stride = session.eval_cfg.get("stride") or session.context
        res = gguf_perplexity(result.path, _split_ids(session, split), session.context, int(stride),
                              threads=ecfg.get("threads"), kv_f32=bool(ecfg.get("kv_f32", True)))  # fmt: skip
        row["runtime"] = "llama-cpp-python"
    else:
        res = session.evaluator(split).evaluate(runtime_model.to(session.device))
        row["runtime"] = "transformers+compressed-tensors"
    if res.n_tokens != score.result.n_tokens:
        raise ExportError(f"the runtime scored {res.n_tokens} tokens, qsweep {score.result.n_tokens}")
    rel = res.perplexity / score.perplexity - 1 if res.ok and score.perplexity else None
    row.update(runtime_perplexity=res.perplexity, runtime_relative_difference=rel)
    if rel is not None and ecfg.get("tolerance") is not None:
        row["within_tolerance"] = abs(rel) <= float(ecfg["tolerance"])
    log.info("perplexity on %r: simulated %.4f, %s %s (%+.4f%%, tolerance %s)", split, score.perplexity,
             row["runtime"], "failed" if res.perplexity is None else f"{res.perplexity:.4f}", 100 * (rel or 0),
             ecfg.get("tolerance"))  # fmt: skip
