"""Search: the space built from units and a precision menu, samplers, the objective, the study, and selection.

The plan flows one way: space/sampler -> objective (score, record) -> study (storage, trials) -> select
(candidates, verification on the report split) -> qsweep.report. qsweep.app.run_search wires them together.
"""

from qsweep.search.config import SearchConfig, search_config
from qsweep.search.front import pareto_indices
from qsweep.search.objective import Objective
from qsweep.search.samplers import SAMPLERS, make_sampler
from qsweep.search.select import Candidate, Verified, candidates, verify
from qsweep.search.space import SearchSpace
from qsweep.search.study import open_storage, open_study, optimize

__all__ = [
    "SAMPLERS",
    "Candidate",
    "Objective",
    "SearchConfig",
    "SearchSpace",
    "Verified",
    "candidates",
    "make_sampler",
    "open_storage",
    "open_study",
    "optimize",
    "pareto_indices",
    "search_config",
    "verify",
]
