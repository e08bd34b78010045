"""What the search needs from an evaluation session, as typed protocols (:class:`qsweep.session.EvalSession` and
the synthetic benchmark's ``ProblemSession`` are two implementations).

The planning layer (phases, refine, warm start, the study builder) uses a session only through the names below;
it never reaches through one into its unit table or plan applier.

* :class:`SearchSession`: what running a study's phases needs: the baseline's bytes and the fitness penalty (the
  scoring itself is a function of the session, ``score(plan) -> PlanScore``, handed to the objective);
* :class:`SensitivitySession`: what building a sensitivity table (``phases.new_sensitivity``) needs besides: the
  baseline's evaluation (its time is the cost unit), the split's evaluator (its tokens and batches), and
  ``out_of_memory_is_an_error(during)``, a context in which the device running out of memory becomes one error
  line. Nothing quantizes a menu ahead: a session's memory grows with the model, not with the menu (issue 18).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from qsweep.evaluate import EvalResult, Evaluator
from qsweep.plan import Plan
from qsweep.score import PlanScore

__all__ = ["SearchSession", "SensitivitySession"]


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

    def check_reference_fits(self, ev: Evaluator, split: str) -> None: ...

    def out_of_memory_is_an_error(self, during: str) -> AbstractContextManager: ...
