"""The bundled model and corpus: loadable offline, small, genuinely trained, and its card's numbers reproduce."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import model_cfg

from qsweep.config import _asset_dir
from qsweep.corpus import SPLITS, bundled_split_text, split_documents, split_of
from qsweep.evaluate import Evaluator
from qsweep.model import load_model, load_tokenizer, unit_table
from qsweep.tiny_card import unigram_perplexity

TINY = _asset_dir("tiny")
CARD = json.loads((Path(TINY) / "card.json").read_text())


def test_bundle_is_small_and_loads_like_a_local_gpt2(gpt2_small_table):
    files = list(Path(TINY).iterdir())
    assert sum(f.stat().st_size for f in files) <= 16 * 2**20
    assert not any(f.suffix in (".bin", ".pt", ".pkl") for f in files)  # safetensors only, no pickle
    model = load_model({"path": TINY})
    tok = load_tokenizer({"path": TINY})
    assert type(model).__name__ == "GPT2LMHeadModel" and len(tok) == model.config.vocab_size == 8192
    table = unit_table(model, model_cfg("gpt2"))
    assert table.names == gpt2_small_table.names  # the seed's named plans apply unchanged
    assert model.lm_head.weight is model.transformer.wte.weight


def test_splits_are_disjoint_and_assigned_by_content():
    docs = split_documents()
    sets = {s: set(d) for s, d in docs.items()}
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert not (sets["validation"] & sets["test"])
    assert all(split_of(d) == s for s in SPLITS for d in docs[s][:50])
    n = sum(len(d) for d in docs.values())
    assert 0.03 < len(docs["test"]) / n < 0.07 and 0.03 < len(docs["validation"]) / n < 0.07


@pytest.fixture(scope="module")
def test_ids():
    if sys.version.split()[0] != CARD["python"]:
        pytest.skip(
            f"the card was measured on Python {CARD['python']}; the corpus differs on {sys.version.split()[0]}"
        )
    text = bundled_split_text("test")
    assert hashlib.sha256(text.encode()).hexdigest() == CARD["test_text_sha256"], "the test split changed"
    return torch.tensor(load_tokenizer({"path": TINY})(text, verbose=False)["input_ids"])


@pytest.mark.slow  # the whole test split (26,777 tokens) through the bundled model: about 6 s on 2 idle cores
def test_stated_test_perplexity_reproduces_to_4_significant_digits(test_ids):
    model = load_model({"path": TINY})
    ctx = CARD["protocol"]["context"]
    res = Evaluator(test_ids, ctx, CARD["protocol"]["stride"], batch_size=16, device="cpu").evaluate(model)
    assert res.n_tokens == CARD["eval_tokens"]["test"]
    assert f"{res.perplexity:.4g}" == f"{CARD['perplexity']['test']:.4g}"


def test_model_is_genuinely_trained(test_ids):
    train_ids = torch.tensor(
        load_tokenizer({"path": TINY})(bundled_split_text("train"), verbose=False)["input_ids"]
    )
    unigram = unigram_perplexity(train_ids, test_ids, 8192)
    assert unigram == pytest.approx(CARD["unigram_test_perplexity"], rel=1e-9)
    assert CARD["perplexity"]["test"] < unigram / 4 and CARD["perplexity"]["test"] < 8192 / 50
