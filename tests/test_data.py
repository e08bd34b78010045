"""Corpora and the token-id cache: tokenize once per (tokenizer, corpus, split); clear offline errors."""

from __future__ import annotations

import pytest
import torch
from conftest import train_tiny_tokenizer

import qsweep.data as data
from qsweep.data import DataLoadError, cache_path, load_token_ids


@pytest.fixture
def counting_tokenize(monkeypatch):
    calls = []
    real = data._tokenize

    def spy(tokenizer, text):
        calls.append(text[:20])
        return real(tokenizer, text)

    monkeypatch.setattr(data, "_tokenize", spy)
    return calls


def test_second_load_reads_the_cache(tmp_path, tiny_dirs, counting_tokenize):
    _, corpus = tiny_dirs
    tok = train_tiny_tokenizer()
    cfg = {"path": str(corpus), "cache_dir": str(tmp_path)}
    first = load_token_ids(cfg, "test", tok)
    second = load_token_ids(cfg, "test", tok)
    assert len(counting_tokenize) == 1
    assert torch.equal(first, second) and first.dtype == torch.int64
    assert torch.equal(
        first, torch.tensor(tok((corpus / "test.txt").read_text(), verbose=False)["input_ids"])
    )
    load_token_ids(cfg, "validation", tok)  # another split: another key
    assert len(counting_tokenize) == 2
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 2


def test_cache_key_depends_on_tokenizer_text_and_split(tmp_path):
    a, b = train_tiny_tokenizer(300), train_tiny_tokenizer(280)
    keys = {
        cache_path(tmp_path, a, "hello", "test"),
        cache_path(tmp_path, b, "hello", "test"),
        cache_path(tmp_path, a, "hello!", "test"),
        cache_path(tmp_path, a, "hello", "validation"),
    }
    assert len(keys) == 4
    assert cache_path(tmp_path, a, "hello", "test") == cache_path(
        tmp_path, train_tiny_tokenizer(300), "hello", "test"
    )


def test_single_file_serves_every_split(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("some text")
    assert data.corpus_text({"path": str(f)}, "validation") == data.corpus_text({"path": str(f)}, "test")


def test_missing_split_file_names_the_splits_found(tiny_dirs):
    _, corpus = tiny_dirs
    with pytest.raises(DataLoadError, match=r"has no train.txt \(splits found: test, validation\)"):
        data.corpus_text({"path": str(corpus)}, "train")


def test_offline_wikitext_says_how_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = {"source": "hf", "dataset": "wikitext", "subset": "qsweep-no-such-config", "text_field": "text"}
    with pytest.raises(
        DataLoadError, match=r"cannot load dataset wikitext/qsweep-no-such-config.*data\.path=FILE"
    ):
        data.corpus_text(cfg, "test")


def test_unknown_source_lists_valid_ones():
    with pytest.raises(DataLoadError, match=r"unknown data.source 'web'; valid: hf, text, bundled"):
        data.corpus_text({"source": "web"}, "test")
