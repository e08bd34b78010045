"""Search: the space built from units and a precision menu, Optuna samplers, and the study runner."""

from qsweep.search.samplers import SAMPLERS, make_sampler
from qsweep.search.space import SearchSpace
from qsweep.search.study import SearchConfig, StudyRunner, run_search

__all__ = ["SAMPLERS", "SearchConfig", "SearchSpace", "StudyRunner", "make_sampler", "run_search"]
