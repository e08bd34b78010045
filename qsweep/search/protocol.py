"""What the search needs from an evaluation session, as typed protocols (:class:`qsweep.session.EvalSession` and
the synthetic benchmark's ``ProblemSession`` are two implementations).

The planning layer (phases, refine, warm start, the study builder) uses a session only through the names below;
it never reaches through one into its unit table or plan applier.

* :class:`SearchSession`: what running a study's phases needs: the baseline's bytes and the fitness penalty (the
  scoring itself is a function of the session, ``score(plan) -> PlanScore``, handed to the objective);
* :class:`SensitivitySession`: what building a sensitivity table (``phases.new_sensitivity``) needs besides: the
  baseline's evaluation (its time is the cost unit), the split's evaluator (its tokens and batches), and
  :func:`prepare_formats`, which quantizes every (unit, format) of a menu ahead.

``EvalSession`` has no ``prepare_formats`` method today; :func:`prepare_formats` calls it where a session has one
and otherwise does the same through the session's unit table and applier, in this one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from qsweep.evaluate import EvalResult, Evaluator
from qsweep.plan import Plan
from qsweep.score import PlanScore

__all__ = ["SearchSession", "SensitivitySession", "prepare_formats"]


@runtime_checkable
class SearchSession(Protocol):
    """A session a study's phases run against."""

    baseline_size_bytes: int
    penalty: float

    def score(self, plan: Plan, split: str) -> PlanScore: ...


@runtime_checkable
class SensitivitySession(SearchSession, Protocol):
    """A session a sensitivity table is measured on (it also goes to ``qsweep.search.sensitivity``'s builders)."""

    def baseline(self, split: str) -> EvalResult: ...

    def evaluator(self, split: str) -> Evaluator: ...


def prepare_formats(session: SensitivitySession, choices: Mapping[str, Sequence[str]]) -> None:
    """Quantize the weights of every unit of ``choices`` in each of its formats ahead (into the applier's bounded
    cache), so that no measurement pays for it: ``session.prepare_formats(choices)`` where the session has it."""
    prepare = getattr(session, "prepare_formats", None)
    if prepare is not None:
        prepare(choices)
        return
    for u, formats in choices.items():
        for f in formats:
            for p in session.table[u].params:
                session.applier.quantized(p.name, p.channel_dim, f)
