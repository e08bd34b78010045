"""Benchmark: memory and time of qsweep at the sizes users quantize, on random-init Llama models of real shapes.

    python -m qsweep.bench.scale                                      # every shape that fits this machine
    python -m qsweep.bench.scale --shapes smollm2-135m --trials 10 --device cpu --max-tokens 4096 --context 512
    python -m qsweep.bench.scale --shapes llama-3-8b --dtype bf16     # one H200

No download: each shape is built from its config (random init, bf16 safetensors in shards of at most 5 GB, the
bundled model's tokenizer, whose ids all lie inside every vocabulary) into ``--dir`` once, then measured through
the real command line in fresh processes, so each number is what a user's run pays:

* ``python -m qsweep ... plan=fp16``: load seconds, one evaluation's seconds (``eval_seconds``), peak device memory
  (``torch.cuda.max_memory_allocated``) and peak host RSS of that process;
* ``python -m qsweep +search=nsga2 search.n_trials=N ...`` (warm start: proxy sensitivity, allocator plans,
  sampler, refine): the sensitivity table's seconds, the trials run, seconds per trial (the search's wall time
  after loading, sensitivity included, over the trials run) and its peaks.

Both run on the bundled corpus (``data=tiny``, validation split for the search, test for the evaluation) with
``eval.max_tokens`` tokens in windows of ``eval.context``. Prints a Markdown table with the bounds of issue 18
(peak GPU <= 2 x the bf16 model bytes + 8 GiB; peak RSS <= 1.2 x the model bytes on a GPU, or the checkpoint +
2 GiB on the CPU; seconds per trial <= 1.5 x one evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

GIB = 2**30

# Llama-architecture shapes (transformers LlamaConfig keys). llama-1.1b and llama-3-8b follow issue 18's numbers
# (vocabulary 32,000, untied head); smollm2-135m and llama-3.2-1b are the published configs.
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1.1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=8192, vocab_size=32000, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # a two-layer toy of the same architecture, for the smoke test (tests/test_memory.py)
    "llama-toy": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=8192, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False, rope_theta=500000.0),
}  # fmt: skip


def build(shape: str, out: Path, device: str = "cpu") -> Path:
    """A random-init model of ``shape`` saved to ``out`` (reused when its config already matches)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, dtype="bfloat16")
    marker = out / "qsweep_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"shape": shape, **SHAPES[shape]}:
        return out
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "assets" / "tiny").save_pretrained(
        out
    )
    marker.write_text(json.dumps({"shape": shape, **SHAPES[shape]}))
    return out


def _run(args: list[str], env: dict, log: Path) -> dict:
    """The JSON line of ``python -m qsweep ARGS``; its output goes to ``log``. A failure: its last error line."""
    proc = subprocess.run([sys.executable, "-m", "qsweep", *args], capture_output=True, text=True, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
        return {"failed": f"exit {proc.returncode}: {(lines or ['no output'])[-1][:300]} (log: {log})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(model_dir: Path, work: Path, *, device: str, dtype: str, context: int, max_tokens: int, trials: int,
            extra: list[str]) -> dict:  # fmt: skip
    """The evaluation and search rows of one model (see the module docstring)."""
    common = ["model=llama", f"model.path={model_dir}", "data=tiny", f"eval.device={device}", f"eval.dtype={dtype}",
              f"eval.context={context}", f"eval.max_tokens={max_tokens}", *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
    one = _run([*common, "plan=fp16", f"hydra.run.dir={work / 'eval'}"], env, work / "eval.log")
    search = _run([*common, "+search=nsga2", f"search.n_trials={trials}", f"hydra.run.dir={work / 'search'}",
                   f"storage.url=sqlite:///{work / 'search' / 'study.db'}"], env, work / "search.log")  # fmt: skip
    row = {"eval": one, "search": search}
    if "failed" not in search:
        summary = json.loads((work / "search" / "results.json").read_text())
        row["sensitivity"] = summary.get("sensitivity")
    return row


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| shape | params | checkpoint GiB | load s | eval s | sensitivity s | trials | s / trial | "
             "peak GPU GiB eval / search | peak RSS GiB eval / search | bounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        e, s = r["eval"], r["search"]
        if "failed" in e or "failed" in s:
            lines.append(f"| {r['shape']} | | {_gib(r['checkpoint_bytes'])} | | | | | | | | "
                         f"failed: {e.get('failed') or s.get('failed')} |")  # fmt: skip
            continue
        er, sr = e["resources"], s["resources"]
        trials = s["n_trials_done"]
        per_trial = (sr["wall_seconds"] - sr["load_seconds"]) / max(trials, 1)
        sens = (r.get("sensitivity") or {}).get("seconds")
        ckpt = r["checkpoint_bytes"]
        gpu = sr["peak_device_bytes"]
        checks = []
        if gpu is not None:
            checks.append(f"GPU {'<=' if gpu <= 2 * ckpt + 8 * GIB else '>'} 2x+8GiB")
            checks.append(f"RSS {'<=' if sr['peak_host_rss_bytes'] <= 1.2 * ckpt else '>'} 1.2x")
        else:
            checks.append(f"RSS {'<=' if sr['peak_host_rss_bytes'] <= ckpt + 2 * GIB else '>'} ckpt+2GiB")
        checks.append(f"trial {'<=' if per_trial <= 1.5 * e['eval_seconds'] else '>'} 1.5x eval")
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e9:.3f}B | {_gib(ckpt)} | {er['load_seconds']:.1f} | "
            f"{e['eval_seconds']:.2f} | {'-' if sens is None else f'{sens:.1f}'} | {trials} | {per_trial:.2f} | "
            f"{_gib(er['peak_device_bytes'])} / {_gib(gpu)} | {_gib(er['peak_host_rss_bytes'])} / "
            f"{_gib(sr['peak_host_rss_bytes'])} | {', '.join(checks)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=None, help=f"comma-separated, of: {', '.join(SHAPES)} (default: all on a "
                    "GPU, smollm2-135m on the CPU)")  # fmt: skip
    ap.add_argument(
        "--dir", type=Path, default=Path("outputs/scale"), help="where models and runs are written"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="eval.dtype (auto: bf16 on a GPU for these checkpoints)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args, extra = ap.parse_known_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (
        args.shapes.split(",") if args.shapes else (list(SHAPES) if device != "cpu" else ["smollm2-135m"])
    )
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(
            f"qsweep.bench.scale: error: unknown shape {unknown[0]!r}; valid: {', '.join(SHAPES)}"
        )
    rows = []
    for shape in shapes:
        model_dir = args.dir / "models" / shape
        subprocess.run([sys.executable, "-c", f"from qsweep.bench.scale import build; from pathlib import Path; "
                        f"build({shape!r}, Path({str(model_dir)!r}), {device!r})"], check=True)  # fmt: skip
        ckpt = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        params = json.loads((model_dir / "config.json").read_text())
        work = args.dir / "runs" / shape
        shutil.rmtree(work, ignore_errors=True)
        row = measure(model_dir, work, device=device, dtype=args.dtype, context=args.context,
                      max_tokens=args.max_tokens, trials=args.trials, extra=extra)  # fmt: skip
        n_params = ckpt // 2  # bf16 safetensors: 2 bytes per parameter (headers are a few KB)
        rows.append({"shape": shape, "params": n_params, "checkpoint_bytes": ckpt, "config": params, **row})
        print("\n".join(table_lines(rows[-1:])[2:]), flush=True)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{name}, torch {torch.__version__}; context {args.context}, {args.max_tokens} tokens, "
          f"{args.trials}-trial warm nsga2 search\n")  # fmt: skip
    print("\n".join(table_lines(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
