"""Corpora -> token ids, cached on disk by (tokenizer, corpus content, split).

Sources (``data.source``; a set ``data.path`` always wins and means a local text corpus):
  * ``hf``: a Hugging Face dataset through ``datasets`` (WikiText-2 by default); a split's rows are joined with
    ``data.joiner`` ("\\n\\n", as the HF perplexity guide does).
  * ``text``: ``data.path`` is a UTF-8 file (used for every split) or a directory of ``<split>.txt`` files.
  * ``bundled``: the project's offline corpus, built from the running Python's standard library
    (:mod:`qsweep.corpus`).

Token ids are stored as safetensors under ``data.cache_dir/tokens/<key>.safetensors``, where the key hashes the
tokenizer's full definition, the corpus text and the split; a study tokenizes each split once. A cache file
carries in its metadata its key, split, ``n_tokens`` and the sha256 of its ids (little-endian int64 bytes), and is
verified whole on every read (hashing a few MB: milliseconds). A file that names another key or split than its
path (a cache copied over another's), whose ids do not match ``n_tokens`` and the checksum (damaged data), that
cannot be read (truncated, corrupt header) or that lacks these fields (written by an older qsweep) is never used:
it is deleted and rebuilt with one warning naming it and what was wrong (:func:`qsweep.corpus.discard_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qsweep.corpus import discard_cache
from qsweep.errors import QsweepError, did_you_mean, first_line

__all__ = ["DataLoadError", "cache_path", "corpus_text", "load_token_ids", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)
SOURCES = ("hf", "text", "bundled")


class DataLoadError(QsweepError, RuntimeError):
    """A corpus cannot be read; the message says what to pass instead."""


@contextlib.contextmanager
def _hub_offline(on: bool):
    """Within: ``datasets`` and ``huggingface_hub`` in offline mode (local cache only, no retries), when ``on``."""
    if not on:
        yield
        return
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _hf_text(cfg: Mapping, split: str) -> str:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataLoadError(f"the `datasets` package is needed for data.source=hf ({e})") from None
    from qsweep.model import hub_unreachable

    name, subset = cfg.get("dataset"), cfg.get("subset")
    offline = hub_unreachable()  # then the local cache only: no retries against a hub that will not answer
    fix = ("pass a local UTF-8 text file with data.path=FILE (or a directory of <split>.txt files), or use the "
           "bundled corpus (data=tiny)")  # fmt: skip
    try:
        with _hub_offline(offline is not None):
            ds = datasets.load_dataset(name, subset, split=split)
    # datasets raises many types offline (ConnectionError, OSError, DatasetNotFoundError...): all mean the same here
    except Exception as e:
        if offline:
            raise DataLoadError(
                f"cannot load dataset {name}/{subset} split {split!r} ({first_line(e)}): the Hugging Face hub is "
                f"out of reach ({offline}), so only a copy in the local cache can be used; {fix}"
            ) from None
        raise DataLoadError(
            f"cannot load dataset {name}/{subset} split {split!r} through `datasets` ({first_line(e)}); offline, "
            f"{fix}"
        ) from None
    field = cfg.get("text_field", "text")
    return str(cfg.get("joiner", "\n\n")).join(ds[field])


def _read_utf8(f: Path) -> str:
    """The text of ``f``; a file that is not UTF-8 text (or holds NUL bytes: binary) is a one-line error."""
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataLoadError(
            f"data.path: {str(f)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"pass a UTF-8 text file (convert it with iconv, or extract the text of a binary document first)"
        ) from None
    if "\0" in text:
        raise DataLoadError(
            f"data.path: {str(f)!r} looks binary (NUL byte at offset {text.index(chr(0))}); pass a UTF-8 "
            f"text file"
        )
    return text


def _file_text(path: Path, split: str) -> str:
    if path.is_dir():
        f = path / f"{split}.txt"
        if not f.is_file():
            have = sorted(p.stem for p in path.glob("*.txt"))
            raise DataLoadError(
                f"data.path={str(path)!r} has no {split}.txt (splits found: {', '.join(have) or 'none'})"
            )
        return _read_utf8(f)
    if not path.is_file():
        raise DataLoadError(
            f"data.path={str(path)!r} is neither a text file nor a directory of <split>.txt files"
        )
    log.warning("data.path=%s is one file: every split (search and report) reads the same text", path)
    return _read_utf8(path)


def corpus_text(cfg: Mapping, split: str) -> str:
    """The raw text of ``split`` of the corpus described by the data config ``cfg``."""
    if cfg.get("path"):
        return _file_text(Path(str(cfg["path"])).expanduser(), split)
    source = cfg.get("source")
    if source == "hf":
        return _hf_text(cfg, split)
    if source == "bundled":
        from qsweep.corpus import SPLITS, CacheError, bundled_split_text

        if split not in SPLITS:
            raise DataLoadError(
                f"unknown split {split!r} of the bundled corpus{did_you_mean(split, SPLITS, n=1)}; valid: "
                f"{', '.join(SPLITS)} (eval.search_split, eval.report_split, split)"
            )
        try:
            return bundled_split_text(split, cfg.get("cache_dir") or "~/.cache/qsweep")
        except CacheError as e:
            raise DataLoadError(str(e)) from None
    if source == "text":
        raise DataLoadError("data.source=text needs data.path=FILE (or a directory of <split>.txt files)")
    raise DataLoadError(f"unknown data.source {source!r}; valid: {', '.join(SOURCES)}")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: class, vocabulary, merges, normalizer, special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary is the best stable description we have
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "add_bos_token", None)).encode())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, tokenizer, text: str, split: str) -> Path:
    key = hashlib.sha256(
        "\0".join(
            [tokenizer_fingerprint(tokenizer), hashlib.sha256(text.encode()).hexdigest(), split]
        ).encode()
    ).hexdigest()[:32]
    return Path(cache_dir).expanduser() / "tokens" / f"{key}.safetensors"


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: the whole split is one sequence, longer than model_max_length by design (we window it).
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def load_token_ids(cfg: Mapping, split: str, tokenizer) -> torch.Tensor:
    """Token ids of ``split`` as a 1-D int64 tensor, from the on-disk cache when present."""
    text = corpus_text(cfg, split)
    if not text.strip():
        raise DataLoadError(f"split {split!r} of the corpus is empty")
    path = cache_path(cfg.get("cache_dir") or "~/.cache/qsweep", tokenizer, text, split)
    if path.is_file():
        ids = _read_cache(path, split)
        if ids is not None:
            return ids
    ids = _tokenize(tokenizer, text)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"ids": ids}, tmp, metadata=_metadata(path.stem, split, ids))
        os.replace(tmp, path)  # atomic: a concurrent or interrupted writer never leaves a torn cache file
    except OSError as e:
        raise DataLoadError(
            f"cannot write the token cache {str(path)!r} ({first_line(e)}); set data.cache_dir (or QSWEEP_CACHE) "
            f"to a writable directory"
        ) from None
    return ids


def _checksum(ids: torch.Tensor) -> str:
    """sha256 of the ids' bytes as little-endian int64 (a view, no copy, on little-endian hosts)."""
    return hashlib.sha256(ids.contiguous().numpy().astype("<i8", copy=False)).hexdigest()


def _metadata(key: str, split: str, ids: torch.Tensor) -> dict[str, str]:
    """What a cache file says about itself: checked by :func:`_read_cache` against its name, split and data."""
    return {"key": key, "split": split, "n_tokens": str(ids.numel()), "sha256": _checksum(ids)}


def _problem(meta: Mapping[str, str], ids: torch.Tensor, key: str, split: str) -> str | None:
    """None when the cache file is the one its name promises, intact; else what is wrong with it (a predicate of
    "token cache PATH", for the warning)."""
    if not all(meta.get(k) for k in ("key", "split", "n_tokens", "sha256")):
        return "has no key and checksum in its metadata (written by an older qsweep)"
    if meta["key"] != key or meta["split"] != split:
        return (
            f"holds split {meta['split']!r} (key {meta['key']}), not split {split!r} (key {key}, its name): "
            f"a copied or renamed file"
        )
    if meta["n_tokens"] != str(ids.numel()):
        return f"is damaged ({ids.numel()} ids, {meta['n_tokens']} in its metadata)"
    if meta["sha256"] != _checksum(ids):
        return "is damaged (checksum mismatch)"
    return None


def _read_cache(path: Path, split: str) -> torch.Tensor | None:
    """The cached ids of ``split`` once verified against the file's name (key), ``split`` and its own metadata
    (``n_tokens``, checksum); else None after deleting the file (unreadable, damaged, another split's or key's,
    written by an older qsweep) with one warning saying what was wrong."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            ids = f.get_tensor("ids") if "ids" in f.keys() else None  # noqa: SIM118 - safe_open is no dict
        if ids is None or ids.dim() != 1 or ids.dtype != torch.int64:
            problem = "is unreadable (it holds no 1-D int64 tensor 'ids')"
        else:
            problem = _problem(meta, ids, path.stem, split)
            if problem is None:
                return ids
    except (SafetensorError, OSError) as e:
        problem = f"is unreadable ({first_line(e)})"
    discard_cache(path, "token cache", problem, DataLoadError)
    return None
