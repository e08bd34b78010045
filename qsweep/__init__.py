"""qsweep: search mixed-precision quantization plans for causal language models."""

from qsweep.apply import PlanApplier, apply_plan_
from qsweep.formats import FORMATS, FloatFormat, Format, IntFormat, get_format, register_format
from qsweep.plan import Plan, PlanError, PlanSpec, load_plan_file, plan_from_config
from qsweep.size import bits_per_param, model_size_bytes, packed_size_bytes
from qsweep.units import ParamInfo, Unit, UnitTable, discover_units

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "FloatFormat",
    "Format",
    "IntFormat",
    "ParamInfo",
    "Plan",
    "PlanApplier",
    "PlanError",
    "PlanSpec",
    "Unit",
    "UnitTable",
    "__version__",
    "apply_plan_",
    "bits_per_param",
    "discover_units",
    "get_format",
    "load_plan_file",
    "model_size_bytes",
    "packed_size_bytes",
    "plan_from_config",
    "register_format",
]
