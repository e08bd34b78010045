"""The bundled offline corpus: English documentation text that every CPython install carries.

Documents are (1) the docstrings of modules, classes and functions in the standard library's source files (read with
``ast``, never imported), test suites and site-packages excluded, and (2) the pydoc topic texts
(``pydoc_data.topics``). Documents shorter than ``MIN_CHARS`` are dropped and exact duplicates kept once.

Each document goes to a split by a hash of its own text (90% train, 5% validation, 5% test), so the splits never
overlap and a document stays in its split as long as its text is unchanged, whatever else changes between Python
versions. A split's text is its documents joined by blank lines, in source order. The text is built from the
running Python at use time (and cached under the data cache directory), never copied into the repository.

The cache file (``data.cache_dir/corpus/<key>.json``, the key hashing the builder version, the Python and its stdlib
files' names, sizes and mtimes) holds ``{"key", "sha256": {split: hex}, "splits": {split: text}}`` and is verified
whole on every read (hashing about 2 MB): a file whose key is not its name's stem (copied from another Python's
cache), whose split texts do not match their checksums (damaged, or splits swapped), that cannot be read (truncated,
not UTF-8 JSON) or that lacks these fields (written by an older qsweep) is never used: it is deleted and rebuilt with
one warning naming it and what was wrong. A cache directory that cannot be written is a one-line error naming
``data.cache_dir``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
from pathlib import Path

from qsweep.errors import first_line

__all__ = [
    "BUILDER_VERSION",
    "SPLITS",
    "CacheError",
    "build_splits",
    "bundled_split_text",
    "corpus_documents",
    "discard_cache",
    "split_documents",
    "split_of",
]

log = logging.getLogger(__name__)
BUILDER_VERSION = 1
MIN_CHARS = 40
SPLITS = ("train", "validation", "test")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not (_EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])))


def _docstrings(source: bytes) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are templates or target other versions
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def corpus_documents() -> list[str]:
    """All documents in source order (stdlib files sorted by path, then pydoc topics sorted by name), deduplicated."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for path in _stdlib_files():
        docs.extend(_docstrings(path.read_bytes()))
    docs.extend(topics[k] for k in sorted(topics))
    seen: set[str] = set()
    unique = []
    for d in docs:
        d = d.strip()
        if len(d) >= MIN_CHARS and d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def split_of(doc: str) -> str:
    """The split a document belongs to, from a hash of its text: 90% train, 5% validation, 5% test."""
    bucket = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:4], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _cache_file(cache_dir: str | Path) -> Path:
    """Cache key: builder version, Python version and the stdlib files' names, sizes and mtimes."""
    h = hashlib.sha256(f"{BUILDER_VERSION}\0{sys.version}\0{sysconfig.get_paths()['stdlib']}".encode())
    for p in _stdlib_files():
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return Path(cache_dir).expanduser() / "corpus" / f"stdlib-{h.hexdigest()[:24]}.json"


def split_documents() -> dict[str, list[str]]:
    """The documents of each split, in source order."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc in corpus_documents():
        parts[split_of(doc)].append(doc)
    return parts


def build_splits() -> dict[str, str]:
    """Each split's text: its documents joined by blank lines."""
    return {s: "\n\n".join(docs) for s, docs in split_documents().items()}


class CacheError(OSError):
    """The cache file cannot be written or deleted; the message names it and what to do (qsweep.data reports it as
    a user error naming ``data.cache_dir``)."""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _problem(cached, key: str) -> str | None:
    """None when ``cached`` (the parsed cache file) is the one its name promises, intact; else what is wrong with
    it (a predicate of "corpus cache PATH", for the warning)."""
    if not isinstance(cached, dict):
        return "is unreadable (it is not a JSON object)"
    if "key" not in cached and all(isinstance(cached.get(s), str) for s in SPLITS):
        return "has no key and checksums (written by an older qsweep)"
    splits, sums = cached.get("splits"), cached.get("sha256")
    if not (
        isinstance(cached.get("key"), str)
        and isinstance(splits, dict)
        and isinstance(sums, dict)
        and all(isinstance(splits.get(s), str) and isinstance(sums.get(s), str) for s in SPLITS)
    ):
        return (
            f"is unreadable (it does not hold a key and the splits {', '.join(SPLITS)} with their checksums)"
        )
    if cached["key"] != key:
        return f"holds the corpus of key {cached['key']}, not {key} (its name): a copied or renamed file"
    bad = [s for s in SPLITS if _sha256(splits[s]) != sums[s]]
    if bad:
        return f"is damaged (checksum mismatch: {', '.join(bad)})"
    return None


def _read_cache(path: Path) -> dict[str, str] | None:
    """The cached splits once verified against the file's name (key) and their checksums; else None after deleting
    the file (unreadable, damaged, another key's, written by an older qsweep) with one warning saying what was
    wrong."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        problem = _problem(cached, path.stem)
        if problem is None:
            return {s: cached["splits"][s] for s in SPLITS}
    except (OSError, ValueError) as e:  # ValueError: malformed JSON or not UTF-8
        problem = f"is unreadable ({first_line(e)})"
    discard_cache(path, "corpus cache", problem, CacheError)
    return None


def discard_cache(path: Path, kind: str, problem: str, error: type[Exception]) -> None:
    """Delete a cache file that must not be used (``kind``, e.g. "token cache"; ``problem``, what is wrong as a
    predicate: "is unreadable (...)", "is damaged (...)") so it is rebuilt, with one warning naming it; ``error`` (a
    user error) if it cannot be deleted. Shared by the corpus and token caches: one path for every bad cache file."""
    log.warning("%s %s %s: deleting and rebuilding it (data.cache_dir)", kind, path, problem)
    try:
        path.unlink()
    except OSError as e:
        raise error(
            f"the {kind} {str(path)!r} {problem} and cannot be deleted ({first_line(e)}); "
            f"delete it by hand or set data.cache_dir to another directory"
        ) from None


def bundled_split_text(split: str, cache_dir: str | Path = "~/.cache/qsweep") -> str:
    """The text of one split of the bundled corpus (built once per Python install, then read from the cache)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the bundled corpus; valid: {', '.join(SPLITS)}")
    path = _cache_file(cache_dir)
    splits = _read_cache(path) if path.is_file() else None
    if splits is not None:
        return splits[split]
    splits = build_splits()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = {"key": path.stem, "sha256": {s: _sha256(t) for s, t in splits.items()}, "splits": splits}
        tmp.write_text(json.dumps(cached), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a concurrent or interrupted writer never leaves a torn cache file
    except OSError as e:
        raise CacheError(
            f"cannot write the corpus cache {str(path)!r} ({first_line(e)}); set data.cache_dir (or QSWEEP_CACHE) "
            f"to a writable directory"
        ) from None
    return splits[split]
