"""The bundled offline corpus: English documentation text that every CPython install carries.

Documents are (1) the docstrings of modules, classes and functions in the standard library's source files (read with
``ast``, never imported), test suites and site-packages excluded, and (2) the pydoc topic texts
(``pydoc_data.topics``). Documents shorter than ``MIN_CHARS`` are dropped and exact duplicates kept once.

Each document goes to a split by a hash of its own text (90% train, 5% validation, 5% test), so the splits never
overlap and a document stays in its split as long as its text is unchanged, whatever else changes between Python
versions. A split's text is its documents joined by blank lines, in source order. The text is built from the
running Python at use time (and cached under the data cache directory), never copied into the repository.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

__all__ = [
    "BUILDER_VERSION",
    "SPLITS",
    "build_splits",
    "bundled_split_text",
    "corpus_documents",
    "split_documents",
    "split_of",
]

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


def bundled_split_text(split: str, cache_dir: str | Path = "~/.cache/qsweep") -> str:
    """The text of one split of the bundled corpus (built once per Python install, then read from the cache)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the bundled corpus; valid: {', '.join(SPLITS)}")
    path = _cache_file(cache_dir)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))[split]
    splits = build_splits()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(splits), encoding="utf-8")
    os.replace(tmp, path)
    return splits[split]
