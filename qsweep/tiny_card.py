"""The bundled model's card (qsweep/assets/tiny/MODEL_CARD.md + card.json): measured on CPU in fp32.

Run through ``python -m qsweep.train_tiny card`` (measure and write) or ``card-md`` (rewrite the Markdown from
card.json); split from qsweep.train_tiny, which holds the training recipe.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny"

__all__ = ["card", "unigram_perplexity", "write_card_markdown"]


def unigram_perplexity(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab: int) -> float:
    """Add-one smoothed unigram model fitted on train, scored on test (every token)."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[test_ids].mean()))


def card(out: Path = ASSET_DIR) -> dict:
    """Measure the bundled model on CPU in fp32 (standard protocol: windows of 256, stride 256) and write its card."""
    from transformers import AutoTokenizer

    from qsweep.apply import PlanApplier
    from qsweep.corpus import bundled_split_text
    from qsweep.evaluate import Evaluator
    from qsweep.model import load_model, unit_table
    from qsweep.plan import Plan, plan_from_config
    from qsweep.size import model_size_bytes, packed_size_bytes

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(out)
    model = load_model({"path": str(out)}, "cpu")
    import yaml

    from qsweep.paths import config_dir

    table = unit_table(
        model, yaml.safe_load((config_dir() / "model" / "gpt2.yaml").read_text())
    )  # tiny: same rules
    ids = {
        s: torch.tensor(tok(bundled_split_text(s), verbose=False)["input_ids"])
        for s in ("train", "validation", "test")
    }
    ctx = model.config.n_positions
    evs = {s: Evaluator(v, ctx, ctx, batch_size=16, device="cpu") for s, v in ids.items()}
    applier = PlanApplier(model, table)
    fp32 = Plan.uniform(table, "fp32")
    applier.apply_(fp32)
    ppl = {s: evs[s].evaluate(model).perplexity for s in evs}
    test = evs["test"]

    def test_ppl(plan: Plan) -> float | None:
        applier.apply_(plan)
        return test.evaluate(model).perplexity

    ln_fp32 = [{"pattern": ".*ln.*", "format": "fp32"}]
    uniform = {}
    for fmt in ("fp16", "bf16", "int8", "int8_channel", "int4", "int4_g128", "int4_g32", "int3", "int3_g128",
                "int2", "int2_g32"):  # fmt: skip
        plan = plan_from_config({"default": fmt, "rules": [] if fmt in ("fp16", "bf16") else ln_fp32}, table)
        uniform[fmt] = {
            "perplexity": test_ppl(plan),
            "model_size_bytes": model_size_bytes(table, plan),
            "packed_size_bytes": packed_size_bytes(table, plan),
        }
    fp16 = Plan.uniform(table, "fp16")
    base16 = uniform["fp16"]["perplexity"]
    sensitivity = {}
    for unit in table.names:
        row = {}
        for fmt in ("int4", "int2"):
            row[fmt] = test_ppl(Plan({**fp16.formats, unit: fmt}))
        sensitivity[unit] = row
    stats = json.loads((out / "corpus.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    result = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "protocol": {"context": ctx, "stride": ctx, "dtype": "fp32", "device": "cpu"},
        "perplexity": ppl,
        "eval_tokens": {s: e.n_tokens for s, e in evs.items()},
        "unigram_test_perplexity": unigram_perplexity(ids["train"], ids["test"], len(tok)),
        "uniform": uniform,
        "sensitivity_test": sensitivity,
        "fp16_test_perplexity": base16,
        "parameters": table.numel,
        "test_text_sha256": __import__("hashlib").sha256(bundled_split_text("test").encode()).hexdigest(),
    }
    (out / "card.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(_card_markdown(result, stats, log))
    return result


def _pct(ppl: float | None, base: float) -> str:
    return "failed" if ppl is None else f"{ppl:.3f} ({100 * (ppl - base) / base:+.2f}%)"


def _int8_verdict(ppl: float | None, base: float) -> str:
    d = None if ppl is None else (ppl - base) / base
    if d is not None and abs(d) < 0.005:
        return (f"Per-tensor INT8 is essentially lossless on this model ({100 * d:+.2f}%), unlike GPT-2 small, whose "
                "outlier dimensions make it cost about 14% on the seed's protocol; its interesting trade-offs are "
                "among INT4 / INT3 / INT2.")  # fmt: skip
    return f"Per-tensor INT8 costs {_pct(ppl, base)} on this model."


def write_card_markdown(out: Path = ASSET_DIR) -> Path:
    """Rewrite MODEL_CARD.md from card.json, corpus.json and train_log.json (no re-measurement)."""
    res = json.loads((out / "card.json").read_text())
    stats = json.loads((out / "corpus.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    path = out / "MODEL_CARD.md"
    path.write_text(_card_markdown(res, stats, log))
    return path


def _card_markdown(res: dict, stats: dict, log: dict) -> str:
    r = log["recipe"]
    base = res["fp16_test_perplexity"]
    lines = [
        "# qsweep bundled model: `tiny` (GPT-2 architecture, trained on the Python standard library's docs)",
        "",
        "A small, briefly trained GPT2LMHeadModel shipped with qsweep so that everything runs offline. It has GPT-2",
        "small's unit names (wte, wpe, h.0 ... h.11, ln_f), so the seed's named plans apply to it unchanged.",
        "",
        "## Model",
        f"- {r['n_layer']} blocks, width {r['n_embd']}, {r['n_head']} heads, context {r['n_positions']}, vocabulary "
        f"{stats['vocab_size']:,} (byte-level BPE trained on the train split), lm_head tied to wte: "
        f"{res['parameters']:,} parameters, stored in fp32 safetensors.",
        "",
        "## Corpus (built from the running Python at use time; see qsweep/corpus.py)",
        "Docstrings of the standard library's modules, classes and functions (read with `ast`, tests excluded) and",
        "the pydoc topics, deduplicated; each document assigned to a split by a hash of its text (90/5/5).",
        f"Measured on Python {stats['python']}:",
        "",
        "| split | documents | characters | tokens |",
        "| --- | --- | --- | --- |",
        *[
            f"| {s} | {stats['documents'][s]:,} | {stats['characters'][s]:,} | {stats['tokens'][s]:,} |"
            for s in ("train", "validation", "test")
        ],
        "",
        "## Training (python -m qsweep.train_tiny train; settings in train_log.json)",
        f"AdamW (betas 0.9/0.95, weight decay {r['weight_decay']}), lr {r['lr']} with {r['warmup_steps']} warm-up steps "
        f"and cosine decay to {r['min_lr_ratio']}x, batch {r['batch_size']} x {r['n_positions']} tokens, "
        f"{r['steps']} steps, dropout {r['dropout']}, grad clip {r['grad_clip']}, seed {r['seed']}, bf16 autocast; "
        f"the checkpoint with the best validation loss (step {log['best']['step']}) is kept. "
        f"Training took {log['train_seconds']:.1f} s on {log['device']} (torch {log['torch']}).",
        "",
        f"## Perplexity (fp32, CPU, windows of {res['protocol']['context']} with stride {res['protocol']['stride']}; "
        f"Python {res['python']}, torch {res['torch']})",
        "",
        "| split | perplexity | scored tokens |",
        "| --- | --- | --- |",
        *[
            f"| {s} | {res['perplexity'][s]:.4f} | {res['eval_tokens'][s]:,} |"
            for s in ("train", "validation", "test")
        ],
        "",
        f"Unigram baseline on the test split (add-one smoothed counts from train): {res['unigram_test_perplexity']:.1f}. "
        f"Vocabulary size: {stats['vocab_size']:,}.",
        "",
        "## Quantization on the test split (every unit in the format, LayerNorms FP32 for the integer rows)",
        "",
        "| format | perplexity (vs fp16) | model_size_bytes (seed accounting) | packed_size_bytes (with scales) |",
        "| --- | --- | --- | --- |",
        *[
            f"| {f} | {_pct(v['perplexity'], base)} | {v['model_size_bytes']:,} | {v['packed_size_bytes']:,} |"
            for f, v in res["uniform"].items()
        ],
        "",
        _int8_verdict(res["uniform"]["int8"]["perplexity"], base),
        "",
        "## Per-unit sensitivity on the test split (that unit alone at int4 / int2, everything else fp16)",
        "",
        "| unit | int4 | int2 |",
        "| --- | --- | --- |",
        *[
            f"| {u} | {_pct(v['int4'], base)} | {_pct(v['int2'], base)} |"
            for u, v in res["sensitivity_test"].items()
        ],
        "",
    ]
    return "\n".join(lines)
