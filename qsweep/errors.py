"""The project's error types. A :class:`QsweepError` is something the user fixes by changing their input: the CLI
prints its message as one line (``qsweep: error: ...``) and exits with status 2. Anything else is a bug and keeps
its traceback.

Messages are one line that names the offending key, file or value and what to do instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ConfigError",
    "QsweepError",
    "did_you_mean",
    "first_line",
    "one_line_errors",
    "read_json_file",
    "user_error_line",
]


class QsweepError(Exception):
    """Base class of user errors (bad config, plan, model, data or storage)."""


class ConfigError(QsweepError, ValueError):
    """A config value that is out of range, unknown or inconsistent with another; names the key."""


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` of a third-party exception, for embedding in a one-line error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def user_error_line(prog: str, err: BaseException) -> str:
    """The one line a command prints for a user error, ``PROG: error: MESSAGE`` (a message that spans lines is
    joined: one error, one line). Every CLI of qsweep prints its QsweepErrors through it."""
    return f"{prog}: error: " + " ".join(line.strip() for line in str(err).strip().splitlines())


def one_line_errors(prog: str):
    """Decorator of a command's ``main``: a :class:`QsweepError` is printed as :func:`user_error_line` and ``main``
    returns 2 (its exit status); anything else is a bug and keeps its traceback."""
    import functools
    import sys

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except QsweepError as e:
                print(user_error_line(prog, e), file=sys.stderr)
                return 2

        return run

    return wrap


def did_you_mean(name: object, choices: Iterable[object], n: int = 3) -> str:
    """`` (did you mean X?)`` naming up to ``n`` of ``choices`` closest to ``name``, or ``""`` when none is close.

    Appended straight after the offending value: ``f"unknown format {name!r}{did_you_mean(name, FORMATS)}; ..."``.
    """
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n)
    if not close:
        return ""
    alternatives = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" (did you mean {alternatives}?)"


def read_json_file(path, what: str, error: type[QsweepError]):
    """The JSON value in ``path``; an unreadable file or malformed JSON raises ``error`` with one line naming
    ``what`` (e.g. "sensitivity file") and the path."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise error(f"{what} {str(path)!r} cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} {str(path)!r}: malformed JSON: {e}") from None
