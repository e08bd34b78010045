"""What every export target shares: its error type, the result record, the plan check and checksums.

An export writes the weights of one plan in a format a real runtime loads. The contract, for every target:
  * the tensors written dequantize to exactly the fake-quantized weights qsweep evaluated (``verify_tensors``);
  * a plan using a format the target cannot store is refused before anything is written, in one line naming the
    unit, its format and the formats the target accepts (``check_formats``);
  * the bytes of tensor data written equal the plan's predicted packed size, the rest of the file being a stated
    overhead (header, metadata, alignment): :class:`ExportResult` records all three;
  * the files carry a SHA-256 of their tensor data, so a truncated or corrupted export is one clear error when
    qsweep loads it (:class:`ExportError`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qsweep.errors import QsweepError
from qsweep.plan import Plan
from qsweep.units import UnitTable

__all__ = ["ExportError", "ExportResult", "check_destination", "check_formats", "sha256_of", "verify_tensors"]


class ExportError(QsweepError, ValueError):
    """An export that cannot be written (plan, model) or read back (truncated, corrupted); one line."""


def check_destination(dest: str | Path) -> Path:
    """The directory an export goes into, made and proven writable (a file created and removed in it): one
    :class:`ExportError` line if ``dest`` is a file, lies under a file, or cannot be made or written. Run before the
    model loads, so that a bad ``export.path`` costs nothing."""
    dest = Path(dest).expanduser()
    where = f"export.path={dest}"
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{where} is a file: name a directory (the export is written into it)")
    above = next((p for p in dest.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ExportError(f"{where} lies under {above}, which is a file: name a directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest, prefix=".qsweep-write-test-"):
            pass
    except OSError as e:
        raise ExportError(f"{where} cannot be written ({os.strerror(e.errno) if e.errno else e}): name a writable "
                          "directory") from None  # fmt: skip
    return dest


@dataclass
class ExportResult:
    """One export: where it is, its sizes (bytes) and how they compare with the plan's predicted packed size."""

    target: str
    path: str  # the GGUF file, or the compressed-tensors directory
    plan_digest: str
    predicted_bytes: int  # qsweep.size.packed_size_bytes of the plan
    tensor_bytes: int  # tensor data written (what the prediction prices)
    file_bytes: int  # everything on disk
    widened_bytes: int = 0  # tensor data above the prediction: values the target stores wider than the plan
    notes: list[str] = field(default_factory=list)

    @property
    def overhead_bytes(self) -> int:
        """File bytes that are not tensor data: header, metadata (the tokenizer, mostly), alignment padding."""
        return self.file_bytes - self.tensor_bytes

    def record(self) -> dict:
        return {**asdict(self), "overhead_bytes": self.overhead_bytes}


def check_formats(table: UnitTable, plan: Plan, accepted: Iterable[str], target: str, extra=None) -> None:
    """Refuse (one line) a unit whose format ``target`` cannot store. ``extra(unit, fmt)`` may refuse more
    (returns a reason or None), e.g. a unit the target keeps unquantized."""
    accepted = list(accepted)
    plan.check_units(table)
    for unit in table:
        fmt = plan[unit.name]
        if fmt not in accepted:
            raise ExportError(
                f"export target {target} cannot store unit {unit.name!r} as {fmt}; {target} accepts: "
                f"{', '.join(accepted)}"
            )
        reason = extra(unit, fmt) if extra else None
        if reason:
            raise ExportError(f"export target {target} cannot store unit {unit.name!r} as {fmt}: {reason}")


def sha256_of(chunks: Iterable[bytes | memoryview]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def verify_tensors(
    expected: Mapping[str, torch.Tensor], exported: Mapping[str, torch.Tensor], table: UnitTable
) -> dict[str, float]:
    """Per unit, the largest |exported - expected| over its parameters (0.0 means bit-identical values).

    ``expected`` are qsweep's fake-quantized weights, ``exported`` the target's dequantized tensors, both by HF
    parameter name in HF layout. A parameter missing from the export is an :class:`ExportError`."""
    out: dict[str, float] = {}
    for unit in table:
        worst = 0.0
        for p in unit.params:
            if p.name not in exported:
                raise ExportError(f"the export has no tensor for parameter {p.name!r} (unit {unit.name!r})")
            a, b = exported[p.name].float().cpu(), expected[p.name].float().cpu()
            if a.shape != b.shape:
                raise ExportError(
                    f"exported {p.name!r} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
                )
            same = torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())
            worst = max(worst, 0.0 if same else float((a - b).abs().max()))
        out[unit.name] = worst
    return out
