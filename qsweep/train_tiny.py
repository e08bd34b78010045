"""The recipe of the bundled model (qsweep/assets/tiny): corpus -> tokenizer -> training -> model card.

    python -m qsweep.train_tiny prepare --work W     # corpus splits, byte-level BPE tokenizer, token ids (CPU)
    python -m qsweep.train_tiny train --work W       # train from W's token ids (GPU if present; CPU works, slowly)
    python -m qsweep.train_tiny export --work W      # W's best weights + tokenizer -> qsweep/assets/tiny
    python -m qsweep.train_tiny card                 # measure and write MODEL_CARD.md + card.json (CPU, fp32)
    python -m qsweep.train_tiny card-md              # rewrite MODEL_CARD.md from card.json

The model is a GPT2LMHeadModel with 12 blocks (so its unit names are GPT-2 small's and the seed's named plans
apply), width 128, 4 heads, context 256, vocabulary 8,192, tied lm_head: 3.46M parameters, 13.8 MB in fp32.
Everything is seeded; training uses deterministic algorithms and eager attention. The steps can run on different
machines: token ids travel as safetensors, so the corpus (which depends on the Python version) is built once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qsweep.tiny_card import card, write_card_markdown

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
EOT = "<|endoftext|>"


@dataclass
class Recipe:
    vocab_size: int = 8192
    n_layer: int = 12
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.1
    batch_size: int = 64
    steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 0


# --- prepare: corpus + tokenizer + token ids ----------------------------------------------------------------------


def prepare(work: Path, recipe: Recipe) -> dict:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from qsweep.corpus import SPLITS, split_documents

    work.mkdir(parents=True, exist_ok=True)
    docs = split_documents()
    splits = {s: "\n\n".join(d) for s, d in docs.items()}
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        splits["train"].split("\n\n"), vocab_size=recipe.vocab_size, min_frequency=2, special_tokens=[EOT],
        show_progress=False,
    )  # fmt: skip
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT
    )
    tok.model_max_length = recipe.n_positions
    tok.save_pretrained(work / "tokenizer")
    stats = {"python": sys.version.split()[0], "documents": {}, "characters": {}, "tokens": {}}
    for split in SPLITS:
        text = splits[split]
        ids = torch.tensor(tok(text, verbose=False)["input_ids"], dtype=torch.int64)
        save_file({"ids": ids}, work / f"{split}.safetensors")
        stats["documents"][split] = len(docs[split])
        stats["characters"][split] = len(text)
        stats["tokens"][split] = ids.numel()
    stats["vocab_size"] = len(tok)
    (work / "corpus.json").write_text(json.dumps(stats, indent=2))
    return stats


# --- train --------------------------------------------------------------------------------------------------------


def _lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    progress = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(r: Recipe, vocab_size: int, eot_id: int, attn: str = "eager"):
    from transformers import GPT2Config, GPT2LMHeadModel

    conf = GPT2Config(
        vocab_size=vocab_size, n_positions=r.n_positions, n_embd=r.n_embd, n_layer=r.n_layer, n_head=r.n_head,
        resid_pdrop=r.dropout, embd_pdrop=r.dropout, attn_pdrop=r.dropout, bos_token_id=eot_id, eos_token_id=eot_id,
    )  # fmt: skip
    conf._attn_implementation = attn
    return GPT2LMHeadModel(conf)


@torch.no_grad()
def _val_loss(model, ids: torch.Tensor, ctx: int, device) -> float:
    """Mean NLL on non-overlapping windows (every token but each window's first scored)."""
    model.eval()
    n = (ids.numel() // ctx) * ctx
    x = ids[:n].view(-1, ctx).to(device)
    total, count = 0.0, 0
    for i in range(0, x.shape[0], 64):
        out = model(x[i : i + 64], labels=x[i : i + 64])
        k = x[i : i + 64].shape[0] * (ctx - 1)
        total += out.loss.double().item() * k
        count += k
    model.train()
    return total / count


def train(work: Path, r: Recipe, device: str = "auto") -> dict:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    tok_conf = json.loads((work / "corpus.json").read_text())
    train_ids = load_file(work / "train.safetensors")["ids"]
    val_ids = load_file(work / "validation.safetensors")["ids"]
    eot_id = json.loads((work / "tokenizer" / "tokenizer.json").read_text())["added_tokens"][0]["id"]
    torch.manual_seed(r.seed)
    model = build_model(r, tok_conf["vocab_size"], eot_id).to(dev).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=r.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(r.seed)
    ctx = r.n_positions
    train_dev = train_ids.to(dev)
    offsets = torch.arange(ctx, device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    best = {"val_loss": math.inf, "step": -1}
    best_state = None
    history = []
    start = time.perf_counter()
    for step in range(r.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, r)
        starts = torch.randint(0, train_ids.numel() - ctx, (r.batch_size,), generator=gen).to(dev)
        x = train_dev[starts[:, None] + offsets]  # [B, ctx]
        with amp:
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        if (step + 1) % r.eval_every == 0 or step + 1 == r.steps:
            vl = _val_loss(model, val_ids, ctx, dev)
            history.append({"step": step + 1, "train_loss": loss.item(), "val_loss": vl,
                            "seconds": time.perf_counter() - start})  # fmt: skip
            print(
                f"step {step + 1:5d}  train {loss.item():.4f}  val {vl:.4f}  ppl {math.exp(vl):.2f}",
                flush=True,
            )
            if vl < best["val_loss"]:
                best = {"val_loss": vl, "step": step + 1}
                best_state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - start
    save_file(
        {k: v.contiguous() for k, v in best_state.items() if k != "lm_head.weight"}, work / "best.safetensors"
    )
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "CPU"
    log = {"recipe": asdict(r), "best": best, "history": history, "train_seconds": seconds, "device": device_name,
           "torch": torch.__version__}  # fmt: skip
    (work / "train_log.json").write_text(json.dumps(log, indent=2))
    return log


# --- export -------------------------------------------------------------------------------------------------------


def export(work: Path, r: Recipe, out: Path = ASSET_DIR) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    model = build_model(r, len(tok), tok.eos_token_id)
    state = load_file(work / "best.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    # inference defaults: no dropout, no pinned attention implementation
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, key, 0.0)
    model.config._attn_implementation = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("corpus.json", "train_log.json"):
        (out / name).write_text((work / name).read_text())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "train", "export", "card", "card-md"])
    ap.add_argument("--work", type=Path, default=Path("outputs/train_tiny"))
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--device", default="auto")
    for f, v in asdict(Recipe()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = ap.parse_args(argv)
    recipe = Recipe(**{f: getattr(args, f) for f in asdict(Recipe())})
    if args.step == "prepare":
        print(json.dumps(prepare(args.work, recipe), indent=2))
    elif args.step == "train":
        log = train(args.work, recipe, args.device)
        print(json.dumps(log["best"]), f"{log['train_seconds']:.1f}s")
    elif args.step == "export":
        print(export(args.work, recipe, args.out))
    elif args.step == "card-md":
        print(write_card_markdown(args.out))
    else:
        res = card(args.out)
        print(json.dumps({k: res[k] for k in ("perplexity", "unigram_test_perplexity")}, indent=2))


if __name__ == "__main__":
    main()
