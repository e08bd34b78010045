"""Exporting a plan as a real quantized model that real runtimes load (README "Export").

Targets: GGUF for llama.cpp (:mod:`qsweep.export.gguf`, GPT-2 and Llama-family models) and compressed-tensors
``pack-quantized`` for vLLM (:mod:`qsweep.export.compressed`, Llama/OPT-style models). Every export dequantizes to
exactly the weights qsweep simulated (:func:`verify_tensors`), prices its tensor data as the plan's packed size
(:class:`ExportResult`), and is measured by a real runtime (:mod:`qsweep.export.runtime`). The command line is
``python -m qsweep +export=gguf|compressed`` (:mod:`qsweep.export.cli`). gguf-py, compressed-tensors and
llama-cpp-python are the optional extra ``.[export]``, imported only when an export runs.
"""

from qsweep.export.common import ExportError, ExportResult, check_formats, verify_tensors
from qsweep.export.compressed import COMPRESSED_ACCEPTS, read_compressed, write_compressed
from qsweep.export.gguf import GGUF_ACCEPTS, GGUFExport, read_gguf, write_gguf
from qsweep.export.runtime import gguf_perplexity, llama_cpp_missing

__all__ = [
    "COMPRESSED_ACCEPTS",
    "GGUF_ACCEPTS",
    "ExportError",
    "ExportResult",
    "GGUFExport",
    "check_formats",
    "gguf_perplexity",
    "llama_cpp_missing",
    "read_compressed",
    "read_gguf",
    "verify_tensors",
    "write_compressed",
    "write_gguf",
]
