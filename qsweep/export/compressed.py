"""compressed-tensors ``pack-quantized`` export (vLLM's checkpoint format) of a plan on a Llama/OPT-style model.

Each integer format of the plan becomes one ``config_groups`` entry (``int8_channel`` -> 8 bits, symmetric,
strategy ``channel``; ``int4_g128`` -> 4 bits, strategy ``group``, group_size 128; ``int8`` -> strategy ``tensor``)
whose ``targets`` are the exact names of the ``nn.Linear`` modules of the units in that format: several groups
make a mixed-precision checkpoint. The scales are written directly (no calibration run): they are qsweep's stored
fp16 scales and the packed codes are qsweep's codes (compressed-tensors' own ``PackedQuantizationCompressor``
packs ``codes * scale`` with that scale, which rounds back to exactly the codes), so the checkpoint dequantizes to
the weights qsweep evaluated, bit for bit.

Everything else (embeddings, lm_head, norms, and the biases of quantized layers) is written unquantized: fp32,
fp16 or bf16 as its unit's format says. A quantized layer's bias holds qsweep's fake-quantized values in fp32 (exact;
its extra bytes over the plan's packed price are ``widened_bytes``). Embeddings, lm_head and norms in an integer
format are refused (compressed-tensors quantizes ``nn.Linear`` layers only), as are formats it cannot express
(flattened groups ``int4``, GGUF block types, bit widths vLLM does not run). ``qsweep_export.json`` holds the plan
and the SHA-256 of the weights file, so :func:`read_compressed` refuses a truncated or corrupted checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from qsweep.errors import first_line
from qsweep.export.common import ExportError, ExportResult, check_formats, sha256_of
from qsweep.formats import FORMATS, IntFormat, get_format
from qsweep.plan import Plan
from qsweep.size import packed_size_bytes
from qsweep.units import UnitTable

__all__ = ["COMPRESSED_ACCEPTS", "MANIFEST", "read_compressed", "write_compressed"]

MANIFEST = "qsweep_export.json"
_WEIGHTS = "model.safetensors"
_STRATEGY = {"tensor": "tensor", "channel": "channel", "group": "group"}
_BITS = (4, 8)  # what vLLM's W4A16 / W8A16 kernels run
_FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPRESSED_ACCEPTS = tuple(
    [*_FLOATS]
    + [
        n
        for n, f in FORMATS.items()
        if isinstance(f, IntFormat) and f.granularity in _STRATEGY and f.bits in _BITS
    ]
)
_INSTALL = 'pip install -e ".[export]"'


def _require():
    try:
        import compressed_tensors  # noqa: F401
        from safetensors.torch import save_file  # noqa: F401
    except ImportError:
        raise ExportError(
            f"the compressed-tensors export needs the compressed-tensors package: {_INSTALL}"
        ) from None


def _linear_owner(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Parameter name -> (name of the nn.Linear that owns it, 'weight' | 'bias'), for every nn.Linear."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            for p_name, _ in mod.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}"] = (mod_name, p_name)
    return out


def _scheme(fmt: IntFormat) -> dict:
    weights = {"num_bits": fmt.bits, "type": "int", "symmetric": True, "strategy": _STRATEGY[fmt.granularity]}
    if fmt.granularity == "group":
        weights["group_size"] = fmt.group_size
    return weights


def write_compressed(
    model: nn.Module, tokenizer, table: UnitTable, plan: Plan, out_dir: str | Path
) -> ExportResult:
    """Write ``plan`` applied to ``model`` (fp32 weights, not yet quantized) as a compressed-tensors checkpoint."""
    _require()
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    owners = _linear_owner(model)
    tied = {id(model.get_output_embeddings().weight)} if model.get_output_embeddings() is not None else set()
    tied.add(id(model.get_input_embeddings().weight))
    params = dict(model.named_parameters())

    def refuse(unit, fmt):
        if fmt in _FLOATS:
            return None
        for p in unit.params:
            if id(params[p.name]) in tied:
                return "embeddings and lm_head stay unquantized in compressed-tensors"
            if p.name not in owners:
                return f"{p.name} is not an nn.Linear parameter (compressed-tensors quantizes nn.Linear layers only)"
            if len(p.shape) == 2 and p.shape[1] % max(get_format(fmt).group_size, 1):
                return f"{p.name}'s {p.shape[1]} inputs are not a multiple of its group size"
        return None

    check_formats(table, plan, COMPRESSED_ACCEPTS, "compressed", refuse)
    out_dir = Path(out_dir)
    state: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    widened = 0
    for unit in table:
        fmt = get_format(plan[unit.name])
        for p in unit.params:
            w = params[p.name].detach().float().cpu()
            if plan[unit.name] in _FLOATS:
                state[p.name] = w.to(_FLOATS[plan[unit.name]]).contiguous()
                continue
            module, kind = owners[p.name]
            if kind == "bias":  # unquantized in the checkpoint: qsweep's values, exactly, in fp32
                state[p.name] = fmt.fake_quant(w, None).contiguous()
                widened += 4 * w.numel() - fmt.packed_bytes(p.shape, None)
                continue
            groups.setdefault(fmt.name, []).append(module)
            scheme = QuantizationScheme(targets=[module], weights=QuantizationArgs(**_scheme(fmt)))
            rows = w.reshape(-1, fmt.group_size) if fmt.granularity == "group" else w
            rows = w.reshape(1, -1) if fmt.granularity == "tensor" else rows
            codes, scale = fmt.quantize_rows(rows)
            values = (codes * scale).reshape(w.shape)  # == fmt.fake_quant(w, 0)
            scale = scale.reshape(w.shape[0], -1) if fmt.granularity != "tensor" else scale.reshape(1)
            packed = PackedQuantizationCompressor.compress(
                {"weight": values, "weight_scale": scale.to(torch.float16)}, scheme
            )
            for key, value in packed.items():
                state[f"{module}.{key}"] = value.contiguous()
    if not groups:
        raise ExportError("the plan quantizes no nn.Linear layer: nothing for compressed-tensors to store")
    qconfig = QuantizationConfig(
        config_groups={
            f"group_{i}": QuantizationScheme(
                targets=sorted(mods), weights=QuantizationArgs(**_scheme(get_format(f)))
            )
            for i, (f, mods) in enumerate(groups.items())
        },
        format="pack-quantized",
        quantization_status="compressed",
        ignore=[],
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.config.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        **qconfig.model_dump(exclude={"quant_method"}),
    }
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    save_file(state, out_dir / _WEIGHTS, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    digest = sha256_of([(out_dir / _WEIGHTS).read_bytes()])
    (out_dir / MANIFEST).write_text(
        json.dumps({"plan": plan.to_dict(), "sha256": {_WEIGHTS: digest}}, indent=2)
    )
    file_bytes = (out_dir / _WEIGHTS).stat().st_size
    shapes = sum(t.numel() * t.element_size() for k, t in state.items() if k.endswith("weight_shape"))
    return ExportResult(
        target="compressed",
        path=str(out_dir),
        plan_digest=plan.digest(),
        predicted_bytes=packed_size_bytes(table, plan),
        tensor_bytes=tensor_bytes,
        file_bytes=file_bytes,
        widened_bytes=widened + shapes,
        notes=[
            f"file_bytes counts {_WEIGHTS} only (its overhead is the safetensors JSON header); widened_bytes: "
            f"biases of quantized layers in fp32 and {shapes} bytes of weight_shape tensors"
        ],
    )


def read_compressed(out_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Plan]:
    """Load a checkpoint :func:`write_compressed` wrote with transformers (which decompresses it through
    compressed-tensors); the SHA-256 in its manifest is checked first. Returns the model (eval mode, weights
    decompressed) and the plan."""
    _require()
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    where = f"compressed-tensors export {str(out_dir)!r}"
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        expected = manifest["sha256"][_WEIGHTS]
        actual = sha256_of([(out_dir / _WEIGHTS).read_bytes()])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(
            f"{where} is incomplete or not a qsweep export ({first_line(e)}); export it again"
        ) from None
    if actual != expected:
        raise ExportError(f"{where} is corrupted: {_WEIGHTS} does not match its SHA-256; export it again")
    try:
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
    except Exception as e:
        raise ExportError(f"{where} cannot be loaded by transformers ({first_line(e)})") from None
    # transformers keeps the layers packed and compressed-tensors decompresses them on the first forward pass of
    # the whole model (its load-time decompression, run_compressed=False, takes one scheme for every layer and
    # fails on mixed plans): one token makes the decompressed weights the model's parameters.
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, dtype=torch.long))
    return model, Plan(manifest["plan"]["units"])
