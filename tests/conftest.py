"""Shared fixtures: unit tables built from configs alone (meta device) and tiny random-init models built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from qsweep.model import meta_model, unit_table

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(*overrides, tmp_path, cache_dir=None):
    """The real config (conf/), composed as ``python -m qsweep`` would with ``overrides``; caches under
    ``cache_dir`` (default: tmp_path/cache)."""
    from hydra import compose, initialize_config_dir

    from qsweep.config import register_configs
    from qsweep.paths import config_dir

    register_configs()
    cache = cache_dir or tmp_path / "cache"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"data.cache_dir={cache}", *overrides])


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory) -> Path:
    """One token and corpus cache (data.cache_dir / QSWEEP_CACHE) for the tests that read the bundled corpus and
    test nothing about caching: building the corpus from the standard library takes about 20 s on 2 cores, paid
    once per session instead of once per test. Tests of the cache itself use their own directory."""
    return tmp_path_factory.mktemp("bundled-cache")


def extra_marks(missing: str | None) -> list:
    """Marks of a test that needs an optional extra: ``extras`` (.ci/run runs these again once the extras are
    installed) and a skip when ``missing`` (why, naming the extra: 'pip install -e ".[export]"') is not None."""
    return [pytest.mark.extras, pytest.mark.skipif(missing is not None, reason=str(missing))]


def needs_extra(missing: str | None):
    """:func:`extra_marks` as a decorator."""

    def mark(fn):
        for m in extra_marks(missing):
            fn = m(fn)
        return fn

    return mark


def model_cfg(name: str, **overrides) -> dict:
    cfg = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    cfg.update(overrides)
    return cfg


def tiny_config(arch: str):
    """A few-thousand-parameter config of each supported architecture family."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=64)
    if arch == "opt":
        return OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            ffn_dim=64,
            vocab_size=101,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    if arch == "llama":
        return LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=101,
            max_position_embeddings=64,
        )
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa")
    return model.float().eval()


@pytest.fixture(scope="session")
def gpt2_small_table():
    """GPT-2 small's unit table at the seed's granularity, from the config alone (no weights, no download)."""
    from transformers import GPT2Config

    return unit_table(meta_model(GPT2Config()), model_cfg("gpt2"))


def _corpus_docs() -> list[str]:
    """Deterministic English-ish text from the running Python (pydoc topics), for tokenizer and split files."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus_docs()[:40], vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=["<|endoftext|>"])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")  # fmt: skip


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A saved tiny 12-block GPT-2 (random init) with its own tokenizer, and a corpus directory of <split>.txt files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tiny")
    tok = train_tiny_tokenizer()
    torch.manual_seed(0)
    # 12 blocks, as GPT-2 small and the bundled model: the seed's named plans apply unchanged
    conf = GPT2Config(n_layer=12, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    model = GPT2LMHeadModel(conf)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    docs = _corpus_docs()
    data = root / "data"
    data.mkdir()
    (data / "validation.txt").write_text("\n\n".join(docs[40:43]))
    (data / "test.txt").write_text("\n\n".join(docs[43:46]))
    return root / "model", data
