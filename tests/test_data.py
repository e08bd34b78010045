"""Corpora and the token-id cache: tokenize once per (tokenizer, corpus, split); clear offline errors; caches that
cannot lie (issue 20): a damaged, copied, lying or old-format token or corpus cache is rebuilt with one warning."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import model_cfg, train_tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qsweep.corpus as corpus
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


def test_an_unreachable_hub_fails_at_once_without_retries(monkeypatch):
    """No HF_HUB_OFFLINE, but the hub does not answer (qsweep.model.hub_unreachable's probe): ``datasets`` runs in
    offline mode (the local cache only) instead of retrying for 23 s, and the line says why and what to pass."""
    import datasets
    from huggingface_hub import constants

    import qsweep.model

    monkeypatch.setattr(qsweep.model, "hub_unreachable", lambda: "huggingface.co:443 does not answer: test")
    seen = {}

    def load_dataset(*args, **kwargs):
        seen["offline"] = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    cfg = {"source": "hf", "dataset": "wikitext", "subset": "wikitext-2-raw-v1", "text_field": "text"}
    with pytest.raises(DataLoadError) as err:
        data.corpus_text(cfg, "test")
    assert seen["offline"] == (True, True) and before == (
        datasets.config.HF_HUB_OFFLINE,
        constants.HF_HUB_OFFLINE,
    )
    assert str(err.value) == (
        "cannot load dataset wikitext/wikitext-2-raw-v1 split 'test' (ConnectionError: Couldn't reach 'wikitext' on "
        "the Hub (OfflineModeIsEnabled)): the Hugging Face hub is out of reach (huggingface.co:443 does not answer: "
        "test), so only a copy in the local cache can be used; pass a local UTF-8 text file with data.path=FILE (or "
        "a directory of <split>.txt files), or use the bundled corpus (data=tiny)"
    )


def test_unknown_source_lists_valid_ones():
    with pytest.raises(DataLoadError, match=r"unknown data.source 'web'; valid: hf, text, bundled"):
        data.corpus_text({"source": "web"}, "test")


# ------------------------------------------------------------------------------------ verified caches (issue 20)


def _cfg(tmp_path, tiny_dirs) -> dict:
    return {"path": str(tiny_dirs[1]), "cache_dir": str(tmp_path)}


def _cache_of(cfg: dict, split: str, tok):
    return cache_path(cfg["cache_dir"], tok, data.corpus_text(cfg, split), split)


def _fresh(cfg: dict, split: str, tok) -> torch.Tensor:
    return torch.tensor(tok(data.corpus_text(cfg, split), verbose=False)["input_ids"])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _metadata(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def _damage_data(path, offset: int = 64, n: int = 16) -> None:
    """Overwrite ``n`` bytes of the tensor data with 0xFF, ``offset`` bytes into it; the header stays intact."""
    blob = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little") + offset  # safetensors: u64 header length, header, data
    blob[start : start + n] = b"\xff" * n
    path.write_bytes(bytes(blob))


def test_a_cache_file_names_its_key_split_size_and_checksum(tmp_path, tiny_dirs, monkeypatch, caplog):
    tok = train_tiny_tokenizer()
    cfg = _cfg(tmp_path, tiny_dirs)
    ids = load_token_ids(cfg, "test", tok)
    path = _cache_of(cfg, "test", tok)
    meta = _metadata(path)
    assert meta["key"] == path.stem and meta["split"] == "test" and meta["n_tokens"] == str(ids.numel())
    assert len(meta["sha256"]) == 64

    def no_tokenizing(tokenizer, text):
        raise AssertionError("a valid cache must be read, not rebuilt")

    monkeypatch.setattr(data, "_tokenize", no_tokenizing)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_token_ids(cfg, "test", tok), ids)
    assert _warnings(caplog) == []


def test_a_cache_with_damaged_data_is_rebuilt_with_one_warning(
    tmp_path, tiny_dirs, counting_tokenize, caplog
):
    tok = train_tiny_tokenizer()
    cfg = _cfg(tmp_path, tiny_dirs)
    load_token_ids(cfg, "test", tok)
    path = _cache_of(cfg, "test", tok)
    _damage_data(path)
    damaged = load_file(path)["ids"]  # the header is intact: an unverified read accepts out-of-range ids
    assert damaged.max() > len(tok) or damaged.min() < 0
    with caplog.at_level(logging.WARNING):
        ids = load_token_ids(cfg, "test", tok)
    assert torch.equal(ids, _fresh(cfg, "test", tok)) and len(counting_tokenize) == 2
    assert _warnings(caplog) == [
        f"token cache {path} is damaged (checksum mismatch): deleting and rebuilding it (data.cache_dir)"
    ]
    assert torch.equal(data._read_cache(path, "test"), ids)  # rewritten, and it verifies


def test_another_splits_cache_copied_over_is_rebuilt_with_one_warning(
    tmp_path, tiny_dirs, counting_tokenize, caplog
):
    tok = train_tiny_tokenizer()
    cfg = _cfg(tmp_path, tiny_dirs)
    test_ids = load_token_ids(cfg, "test", tok)
    load_token_ids(cfg, "validation", tok)
    test_path, val_path = _cache_of(cfg, "test", tok), _cache_of(cfg, "validation", tok)
    shutil.copyfile(test_path, val_path)
    with caplog.at_level(logging.WARNING):
        ids = load_token_ids(cfg, "validation", tok)
    assert torch.equal(ids, _fresh(cfg, "validation", tok)) and not torch.equal(ids, test_ids)
    (warning,) = _warnings(caplog)
    assert warning.startswith(
        f"token cache {val_path} holds split 'test' (key {test_path.stem}), not split 'validation' "
        f"(key {val_path.stem}, its name): a copied or renamed file"
    )
    assert _metadata(val_path)["split"] == "validation" and len(counting_tokenize) == 3


@pytest.mark.parametrize(("lie", "problem"), [
    ({"key": None, "sha256": None}, "has no key and checksum in its metadata (written by an older qsweep)"),
    ({"n_tokens": "7"}, "is damaged ({n} ids, 7 in its metadata)"),
    ({"sha256": "0" * 64}, "is damaged (checksum mismatch)"),
    ({"key": "0" * 32}, "holds split 'test' (key 00000000000000000000000000000000), not split 'test'"),
])  # fmt: skip
def test_a_cache_whose_metadata_does_not_match_is_rebuilt(
    tmp_path, tiny_dirs, counting_tokenize, caplog, lie, problem
):
    """Old-format caches (split and n_tokens only, as qsweep wrote them before issue 20) and metadata that
    disagrees with the name or the data: one warning each, never used."""
    tok = train_tiny_tokenizer()
    cfg = _cfg(tmp_path, tiny_dirs)
    ids = load_token_ids(cfg, "test", tok)
    path = _cache_of(cfg, "test", tok)
    meta = {k: v for k, v in {**_metadata(path), **lie}.items() if v is not None}
    save_file({"ids": ids}, path, metadata=meta)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_token_ids(cfg, "test", tok), ids)
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"token cache {path} {problem.format(n=ids.numel())}")
    assert len(counting_tokenize) == 2 and _metadata(path)["key"] == path.stem


def test_evaluation_after_a_swapped_or_damaged_cache_reports_the_right_split(tmp_path, tiny_dirs, caplog):
    """Through EvalSession: the validation perplexity is the validation split's, not the copied test split's, and a
    damaged cache no longer ends in an IndexError at evaluation (out-of-range ids)."""
    from qsweep.session import EvalSession

    model_dir, corpus_dir = tiny_dirs
    cfg = {
        "model": {**model_cfg("gpt2"), "path": str(model_dir), "name": None},
        "data": {"name": "text", "source": "text", "path": str(corpus_dir), "cache_dir": str(tmp_path)},
        "eval": {"name": "t", "context": 32, "stride": 32, "max_tokens": 1024, "device": "cpu"},
        "baseline": {"plan": "fp16"},
    }
    first = EvalSession(cfg)
    truth = {s: first.baseline_perplexity(s) for s in ("validation", "test")}
    assert truth["validation"] != truth["test"]
    tok, dcfg = first.tokenizer, cfg["data"]
    val_path = _cache_of(dcfg, "validation", tok)
    for spoil in (
        lambda: shutil.copyfile(_cache_of(dcfg, "test", tok), val_path),
        lambda: _damage_data(val_path),
    ):
        spoil()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert EvalSession(cfg).baseline_perplexity("validation") == truth["validation"]
        (warning,) = (w for w in _warnings(caplog) if "token cache" in w)
        assert warning.startswith(f"token cache {val_path} ")


# ---------------------------------------------------------------------------- the bundled corpus's cache


@pytest.fixture
def small_bundled(monkeypatch) -> dict[str, str]:
    """The bundled corpus builder replaced by three short splits (the real one reads the whole stdlib)."""
    splits = {s: f"the {s} split of a small corpus, long enough to tell apart" for s in corpus.SPLITS}
    monkeypatch.setattr(corpus, "build_splits", lambda: dict(splits))
    return splits


def _swap(cached: dict, a: str, b: str) -> dict:
    cached["splits"][a], cached["splits"][b] = cached["splits"][b], cached["splits"][a]
    return cached


@pytest.mark.parametrize(("spoil", "problem"), [
    (lambda c: {**c, "splits": {**c["splits"], "test": c["splits"]["test"].replace("small", "SMALL")}},
     "is damaged (checksum mismatch: test)"),
    (lambda c: _swap(c, "validation", "test"), "is damaged (checksum mismatch: validation, test)"),
    (lambda c: {**c, "key": "stdlib-000000000000000000000000"},
     "holds the corpus of key stdlib-000000000000000000000000, not "),
    (lambda c: c["splits"], "has no key and checksums (written by an older qsweep)"),
])  # fmt: skip
def test_a_corpus_cache_that_does_not_match_is_rebuilt_with_one_warning(
    tmp_path, small_bundled, caplog, spoil, problem
):
    """Valid JSON that would have been used before issue 20: a changed character, swapped splits, another
    Python's cache copied over (another key), the old format without key and checksums."""
    assert corpus.bundled_split_text("test", tmp_path) == small_bundled["test"]
    (path,) = (tmp_path / "corpus").glob("*.json")
    path.write_text(json.dumps(spoil(json.loads(path.read_text()))))
    with caplog.at_level(logging.WARNING):
        assert corpus.bundled_split_text("test", tmp_path) == small_bundled["test"]
        assert corpus.bundled_split_text("validation", tmp_path) == small_bundled["validation"]
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"corpus cache {path} {problem}") and "deleting and rebuilding it" in warning
    assert corpus._read_cache(path) == small_bundled and json.loads(path.read_text())["key"] == path.stem
