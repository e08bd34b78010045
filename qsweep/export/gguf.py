"""GGUF export (llama.cpp and everything built on it) of a plan on a GPT-2 or Llama-family model, and its reader.

The file is written with gguf-py directly (not llama.cpp's converter, which needs ``n_ctx`` in the model config and
refuses a BPE it does not recognise): architecture ``gpt2``, ``llama`` (Llama, Mistral, SmolLM) or ``qwen2``, the
hyperparameters llama.cpp's loader reads for it (heads and key/value heads, RMSNorm epsilon, RoPE base and
dimensions), the model's own byte-level BPE vocabulary and merges, and one tensor per parameter with llama.cpp's
tensor names, each in the type its unit's format stores it as:

  * ``q8_0`` / ``q4_0`` / ``q4_1`` / ``q5_0`` / ``q5_1`` (:class:`~qsweep.formats.GGUFFormat`): the ggml block type,
    quantized by gguf-py from the fp32 weight (bit-exact with ggml), 1-D tensors F32, rows not a multiple of 32 F16;
  * ``q2_K`` ... ``q6_K`` (:class:`~qsweep.formats.KQuantFormat`): packed by :mod:`qsweep.kquants` (llama.cpp's
    reference quantizer, byte for byte); rows not a multiple of 256 in the fallback type ``llama-quantize`` uses;
  * ``fp32`` / ``fp16`` / ``bf16``: F32 / F16 / BF16; 1-D tensors (biases, LayerNorms) are always written F32
    (llama.cpp's CPU kernels add and multiply them as F32), holding the fp16/bf16-rounded values: those are the
    only tensor bytes above the predicted size (``widened_bytes``).

GPT-2's Conv1D weights are stored ``[in, out]`` and written transposed (``[out, in]``, blocks of 32 along the input),
as llama.cpp's converter does; for ``llama`` the rows of Q and K are permuted to llama.cpp's rotary order, as its
converter does (whole rows move, so each row quantizes as simulated). A tied ``lm_head`` is not a parameter of its
own: llama.cpp reuses ``token_embd``. qsweep adds three metadata keys: ``qsweep.plan`` (the plan, JSON),
``qsweep.tensors`` (GGUF name -> HF name, whether it was transposed, heads it was permuted by) and
``qsweep.tensor_sha256`` (of all tensor data, in file order), so that
:func:`read_gguf` maps the file back to the model's parameters and refuses a truncated or corrupted file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qsweep import kquants
from qsweep.errors import first_line
from qsweep.export.common import ExportError, ExportResult, check_formats, sha256_of
from qsweep.formats import GGUFFormat, KQuantFormat, get_format
from qsweep.plan import Plan
from qsweep.size import packed_size_bytes
from qsweep.units import UnitTable

__all__ = ["GGUF_ACCEPTS", "GGUFExport", "read_gguf", "require_gguf", "write_gguf"]

GGUF_ACCEPTS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", *kquants.KQUANTS, "fp32", "fp16", "bf16")
_FLOAT_TYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_INSTALL = 'pip install -e ".[export]"'


def require_gguf():
    """The ``gguf`` module (gguf-py), or an :class:`ExportError` saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ExportError(f"the GGUF export needs the gguf package (gguf-py): {_INSTALL}") from None
    return gguf


def model_name(conf) -> str:
    """The model's name for ``general.name``: its hub id, or the last component of a local directory (never a local
    path)."""
    name = str(getattr(conf, "_name_or_path", "") or "").rstrip("/\\")
    if not name:
        return "qsweep export"
    local = os.path.isabs(os.path.expanduser(name)) or name.startswith(".") or os.path.exists(name)
    return Path(name).name if local else name


def _storage(fmt_name: str, shape: tuple[int, ...]) -> str:
    """GGML type of a tensor of ``shape`` (already ``[out, in]`` for 2-D) stored in format ``fmt_name``."""
    fmt = get_format(fmt_name)
    if isinstance(fmt, (GGUFFormat, KQuantFormat)):
        return fmt.storage(shape, 0 if len(shape) == 2 else None)
    return _FLOAT_TYPES[fmt_name] if len(shape) >= 2 else "F32"


def _tensor_bytes(gguf, w: torch.Tensor, fmt_name: str, ggml_type: str) -> np.ndarray:
    """The data written for fp32 weight ``w`` ``[out, in]`` (or 1-D): a numpy array gguf-py's writer takes."""
    if ggml_type == "F32":
        return get_format(fmt_name).fake_quant(w, 0 if w.ndim == 2 else None).numpy().astype(np.float32)
    if ggml_type == "F16":
        return w.numpy().astype(np.float16)
    kind = ggml_type.lower().replace("_k", "_K")
    if kind in kquants.KQUANTS:  # qsweep's port of llama.cpp's reference quantizer (gguf-py has none)
        blocks = w.reshape(-1, kquants.QK_K)
        step = 4096  # super-blocks at a time: bounded temporaries
        packed = [
            kquants.pack(kquants.quantize(blocks[i : i + step], kind), kind)
            for i in range(0, len(blocks), step)
        ]
        return np.concatenate(packed).reshape(w.shape[0], -1)
    return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[ggml_type])


# llama.cpp's pre-tokenizer by model type (how text is split before BPE; token ids given directly do not use it)
_PRE = {"gpt2": "gpt-2", "qwen2": "qwen2"}


def _vocab(gguf, tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (id order, padded to the embedding's rows), their GGUF token types, and the BPE merges."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        kind = (
            model.get("type") if model.get("type") != "BPE" else "a BPE without byte-level pre-tokenization"
        )
        raise ExportError(f"the GGUF export writes byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2, SmolLM); this "
                          f"tokenizer is {kind} (SentencePiece-style, as Llama 2 and Mistral have)")  # fmt: skip
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    by_id = {i: tok for tok, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the embedding only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        if tok is None:
            types.append(int(gguf.TokenType.UNUSED))
        else:
            types.append(int(gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


# transformers model_type -> (GGUF architecture, Q/K rows permuted as llama.cpp's converter does)
ARCHITECTURES = {"gpt2": ("gpt2", False), "llama": ("llama", True), "mistral": ("llama", True),
                 "qwen2": ("qwen2", False)}  # fmt: skip


def _heads(w: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's Q/K row order (``convert_hf_to_gguf``'s ``LlamaModel.permute``: each head's rotary halves
    interleaved), or back (``inverse``). Rows move whole: each row's blocks, and so its quantization, are unchanged."""
    halves = (n_head, w.shape[0] // n_head // 2, 2) if inverse else (n_head, 2, w.shape[0] // n_head // 2)
    return w.reshape(*halves, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permuted_heads(conf, hf_name: str) -> int:
    """Heads to permute ``hf_name`` by (0: none): q_proj by the attention heads, k_proj by the key/value heads."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return conf.num_attention_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return getattr(conf, "num_key_value_heads", None) or conf.num_attention_heads
    return 0


def _architecture(conf) -> tuple[str, bool]:
    kind = getattr(conf, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ExportError(f"the GGUF export writes {', '.join(ARCHITECTURES)} models; this model is {kind!r} (use "
                          "+export=compressed for OPT)")  # fmt: skip
    scaling = getattr(conf, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ExportError(f"the GGUF export does not write RoPE scaling ({scaling}); this model uses it")
    return ARCHITECTURES[kind]


def _rope_theta(conf) -> float:
    theta = getattr(conf, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = (getattr(conf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _hyperparameters(writer, conf, arch: str) -> None:
    """The keys llama.cpp's loader reads for ``arch``."""
    if arch == "gpt2":
        writer.add_context_length(conf.n_positions)
        writer.add_embedding_length(conf.n_embd)
        writer.add_feed_forward_length(conf.n_inner or 4 * conf.n_embd)
        writer.add_block_count(conf.n_layer)
        writer.add_head_count(conf.n_head)
        writer.add_layer_norm_eps(conf.layer_norm_epsilon)
        return
    n_head = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // n_head
    writer.add_context_length(conf.max_position_embeddings)
    writer.add_embedding_length(conf.hidden_size)
    writer.add_feed_forward_length(conf.intermediate_size)
    writer.add_block_count(conf.num_hidden_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(conf, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(conf.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(conf))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != conf.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(conf.vocab_size)


@dataclass
class GGUFTensor:
    """One parameter as the GGUF file holds it: llama.cpp's tensor name, the unit's format and the GGML type it
    stores the tensor as (the unit's format, or its fallback for this shape), and how its rows are laid out."""

    name: str
    param: object  # qsweep.units' parameter record (name, shape, channel_dim)
    fmt: str
    ggml_type: str
    transposed: bool  # Conv1D [in, out] written [out, in]
    heads: int  # rows permuted to llama.cpp's rotary order by this many heads (0: not permuted)
    source: torch.Tensor

    def weight(self) -> torch.Tensor:
        """The fp32 tensor as written: ``[out, in]``, Q/K rows permuted."""
        w = self.source.detach().float().cpu()
        if self.transposed:
            w = w.t().contiguous()
        return _heads(w, self.heads).contiguous() if self.heads else w


def gguf_tensors(model: nn.Module, table: UnitTable, plan: Plan) -> list[GGUFTensor]:
    """Every parameter of ``model`` under ``plan`` as a GGUF tensor (what :func:`write_gguf` writes and a
    llama-quantize recipe names), in the unit table's order."""
    gguf = require_gguf()
    conf = model.config
    arch, permute = _architecture(conf)
    check_formats(table, plan, GGUF_ACCEPTS, "gguf")
    params = dict(model.named_parameters())
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH[arch.upper()], conf.n_layer if arch == "gpt2" else conf.num_hidden_layers
    )
    out = []
    for unit in table:
        for p in unit.params:
            gname = names.get_name(p.name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ExportError(f"no GGUF tensor name for parameter {p.name!r} (unit {unit.name!r})")
            shape = tuple(p.shape)
            transposed = p.channel_dim == 1 and len(shape) == 2
            stored = tuple(reversed(shape)) if transposed else shape
            fmt = plan[unit.name]
            out.append(GGUFTensor(gname, p, fmt, _storage(fmt, stored), transposed,
                                  _permuted_heads(conf, p.name) if permute else 0, params[p.name]))  # fmt: skip
    return out


def write_gguf(model: nn.Module, tokenizer, table: UnitTable, plan: Plan, path: str | Path) -> ExportResult:
    """Write ``plan`` applied to ``model`` (fp32 weights, not yet quantized) as the GGUF file ``path``: GPT-2, or a
    Llama-family model (Llama, Mistral, SmolLM: architecture ``llama``; Qwen2: ``qwen2``)."""
    gguf = require_gguf()
    conf = model.config
    arch, _ = _architecture(conf)
    path = Path(path)
    arrays: list[tuple[str, np.ndarray, str]] = []
    mapping: dict[str, list] = {}
    widened = 0
    for t in gguf_tensors(model, table, plan):
        data = _tensor_bytes(gguf, t.weight(), t.fmt, t.ggml_type)
        widened += data.nbytes - get_format(t.fmt).packed_bytes(t.param.shape, t.param.channel_dim)
        arrays.append((t.name, data, t.ggml_type))
        mapping[t.name] = [t.param.name, t.transposed, t.heads]
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tokens, types, merges = _vocab(gguf, tokenizer, n_vocab)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(model_name(conf))
    _hyperparameters(writer, conf, arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE (_vocab refuses anything else)
    writer.add_tokenizer_pre(_PRE.get(conf.model_type, "gpt-2"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, tok_id in (("bos", conf.bos_token_id), ("eos", conf.eos_token_id)):
        if tok_id is not None:
            getattr(writer, f"add_{key}_token_id")(int(tok_id))
    writer.add_string("qsweep.plan", plan.to_json())
    writer.add_string("qsweep.tensors", json.dumps(mapping))
    writer.add_string("qsweep.tensor_sha256", sha256_of(a.tobytes() for _, a, _ in arrays))
    for gname, data, ggml_type in arrays:
        raw = None if ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[ggml_type]
        writer.add_tensor(gname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)  # a crash mid-write leaves no file that looks complete
    tensor_bytes = sum(a.nbytes for _, a, _ in arrays)
    padding = sum(-a.nbytes % writer.data_alignment for _, a, _ in arrays)
    file_bytes = path.stat().st_size
    return ExportResult(
        target="gguf",
        path=str(path),
        plan_digest=plan.digest(),
        predicted_bytes=packed_size_bytes(table, plan),
        tensor_bytes=tensor_bytes,
        file_bytes=file_bytes,
        widened_bytes=widened,
        notes=[
            f"overhead {file_bytes - tensor_bytes} bytes: header, metadata (tokenizer vocabulary and merges, "
            f"hyperparameters, qsweep.* keys) and tensor infos {file_bytes - tensor_bytes - padding}, padding of "
            f"tensor data to {writer.data_alignment}-byte alignment {padding}"
        ],
    )


@dataclass
class GGUFExport:
    """A GGUF file read back: dequantized fp32 tensors by HF parameter name (HF layout), their GGML types, the
    plan it was written from and the architecture's hyperparameters."""

    tensors: dict[str, torch.Tensor]
    types: dict[str, str]
    plan: Plan
    metadata: dict


def _field(reader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def read_gguf(path: str | Path) -> GGUFExport:
    """Read and check a GGUF file qsweep wrote; one :class:`ExportError` line if it is truncated or corrupted."""
    gguf = require_gguf()
    path = Path(path)
    where = f"GGUF file {str(path)!r}"
    if not path.is_file():
        raise ExportError(f"{where} does not exist")
    try:
        reader = gguf.GGUFReader(path)
        tensors = list(reader.tensors)
        checksum, mapping, plan_json = (
            _field(reader, k) for k in ("qsweep.tensor_sha256", "qsweep.tensors", "qsweep.plan")
        )
    except Exception as e:  # gguf-py raises ValueError, KeyError, IndexError... on a damaged file
        raise ExportError(f"{where} is truncated or corrupted ({first_line(e)}); export it again") from None
    if checksum is None or mapping is None:
        raise ExportError(
            f"{where} was not written by qsweep (no qsweep.tensor_sha256 / qsweep.tensors keys)"
        )
    if sha256_of(bytes(t.data.reshape(-1).view(np.uint8)) for t in tensors) != checksum:
        raise ExportError(
            f"{where} is corrupted: its tensor data does not match its SHA-256; export it again"
        )
    mapping = json.loads(mapping)
    out, types = {}, {}
    for t in tensors:
        hf_name, transposed, heads = (mapping[t.name] + [0])[:3]  # files before Llama support hold two fields
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape(tuple(reversed([int(d) for d in t.shape])))
        if heads:
            w = _heads(w, heads, inverse=True).contiguous()
        out[hf_name] = w.t().contiguous() if transposed else w
        types[hf_name] = t.tensor_type.name
    arch = _field(reader, "general.architecture") or "gpt2"
    meta = {
        k: _field(reader, f"{arch}.{k}")
        for k in ("context_length", "embedding_length", "block_count", "feed_forward_length")
    }
    return GGUFExport(out, types, Plan(json.loads(plan_json)["units"]), meta)
