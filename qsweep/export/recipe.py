"""A plan as a ``llama-quantize`` recipe: the per-tensor types that make llama.cpp's own quantizer produce the plan
from a full-precision GGUF of the same architecture, for models too large to search or export in memory.

``+export=recipe`` writes ``recipe-<plan digest>.txt``: one ``--tensor-type`` argument per quantizable tensor,
``^<GGUF tensor name>$=<ggml type>`` (llama-quantize matches each pattern with ``std::regex_search``, first match
wins), in the type qsweep stores that tensor as (the unit's format, or llama-quantize's own fallback for a shape the
format cannot hold, :class:`qsweep.formats.KQuantFormat`), and the command::

    llama-quantize --tensor-type-file recipe-<digest>.txt MODEL-F32.gguf MODEL-<digest>.gguf q8_0

(``q8_0``: the base type; every quantizable tensor is named, so it only makes the overrides apply, which
llama-quantize does for a quantized base type). What llama-quantize never changes is kept as the source holds it and
listed in ``kept``: 1-D tensors and norms (F32 in qsweep's and llama.cpp's converters' files, as qsweep prices them)
and GPT-2's position embeddings. From an F32 source (``convert_hf_to_gguf.py --outtype f32``, or qsweep's
``+export=gguf plan=fp32``) the result holds the bytes qsweep's own GGUF export of the plan holds (a slow test
checks it); from an F16/BF16 source, the weights are rounded to 16 bits before they are quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from qsweep.export.gguf import gguf_tensors
from qsweep.plan import Plan
from qsweep.units import UnitTable

__all__ = ["BASE_TYPE", "Recipe", "write_recipe"]

BASE_TYPE = "q8_0"
_NOT_QUANTIZED = ("position_embd.weight", "token_types.weight")  # llama-quantize keeps these as in the source


def _llama_type(ggml_type: str) -> str:
    """ggml's type name as llama-quantize parses it (``q4_K``, ``q8_0``, ``f16``)."""
    return ggml_type.lower().replace("_k", "_K")


@dataclass
class Recipe:
    """A plan as llama-quantize arguments: ``tensor_types`` (pattern -> type), what it ``kept`` and why."""

    path: str
    plan_digest: str
    tensor_types: dict[str, str]
    kept: dict[str, str] = field(
        default_factory=dict
    )  # GGUF tensor -> why llama-quantize leaves it as the source

    def command(self, source: str = "MODEL-F32.gguf", output: str | None = None) -> str:
        out = output or f"MODEL-{self.plan_digest}.gguf"
        return f"llama-quantize --tensor-type-file {Path(self.path).name} {source} {out} {BASE_TYPE}"

    def record(self) -> dict:
        types: dict[str, int] = {}
        for t in self.tensor_types.values():
            types[t] = types.get(t, 0) + 1
        return {"target": "recipe", "path": self.path, "plan_digest": self.plan_digest,
                "tensors": len(self.tensor_types), "types": types, "kept": self.kept, "command": self.command()}  # fmt: skip


def write_recipe(model: nn.Module, table: UnitTable, plan: Plan, path: str | Path) -> Recipe:
    """Write ``plan``'s llama-quantize recipe for ``model`` to ``path`` (module docstring)."""
    types: dict[str, str] = {}
    kept: dict[str, str] = {}
    for t in gguf_tensors(model, table, plan):
        if len(t.param.shape) < 2 or t.name.endswith(
            "_norm.weight"
        ):  # never quantized; F32 as qsweep prices them
            if t.fmt in ("fp16", "bf16"):
                kept[t.name] = (
                    f"1-D, planned {t.fmt}: llama-quantize keeps the source's F32 values (qsweep rounds them)"
                )
            continue
        if t.name in _NOT_QUANTIZED:
            if t.ggml_type != "F32":
                kept[t.name] = f"planned {t.fmt} ({t.ggml_type}); llama-quantize keeps it as in the source"
            continue
        types[f"^{re.escape(t.name)}$"] = _llama_type(t.ggml_type)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in types.items()))
    tmp.replace(path)
    return Recipe(str(path), plan.digest(), types, kept)
