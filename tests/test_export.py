"""Exports: GGUF-native formats are gguf-py's quantizers bit for bit; exported files dequantize to exactly the
fake-quantized weights, unit by unit; tensor bytes equal the predicted packed size; damaged files are one error;
real runtimes (llama-cpp-python, transformers + compressed-tensors) reproduce the simulated perplexity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, model_cfg, needs_extra, tiny_model
from test_cli import run_qsweep, tiny_overrides

from qsweep.apply import apply_plan_
from qsweep.evaluate import Evaluator
from qsweep.export.common import ExportError, verify_tensors
from qsweep.export.gguf import GGUF_ACCEPTS, read_gguf, write_gguf
from qsweep.export.runtime import gguf_perplexity, llama_cpp_missing
from qsweep.formats import get_format
from qsweep.model import load_model, load_tokenizer, unit_table
from qsweep.plan import Plan, PlanSpec
from qsweep.size import packed_size_bytes

try:  # the export extra: without it, the tests that need it skip, naming the extra
    import gguf
except ImportError:
    gguf = None
EXTRA = 'pip install -e ".[export]"'
needs_gguf = needs_extra(None if gguf else f"needs gguf-py (the export extra): {EXTRA}")
needs_llama = needs_extra(llama_cpp_missing())

GGUF_NATIVE = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}


def _hard_weights() -> torch.Tensor:
    """[64, 256] with every edge case of the block quantizers in its first rows (shape [out, in])."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-6, 1, 64).unsqueeze(
        1
    )  # fp16-subnormal scales too
    w[0, :32] = torch.arange(-15.5, 16.0)  # ties at every .5
    w[1, :32] = 0.0  # a zero block
    w[2, :32] = torch.tensor([0.5, -0.5] * 16)  # |max| tie between signs: the first one decides Q4_0's sign
    w[3, :32] = 3.0  # a constant block (max == min)
    w[4, :32] = -torch.linspace(0, 1, 32)  # all non-positive
    return w


def _gguf_roundtrip(w: np.ndarray, name: str) -> np.ndarray:
    t = gguf.GGMLQuantizationType[name.upper()]
    return gguf.quants.dequantize(gguf.quants.quantize(w, t), t)


@needs_gguf
@pytest.mark.parametrize("name", GGUF_NATIVE)
def test_gguf_formats_are_gguf_py_bit_for_bit(name):
    fmt, w = get_format(name), _hard_weights()
    reference = _gguf_roundtrip(w.numpy(), name)
    assert np.array_equal(fmt.fake_quant(w, channel_dim=0).numpy(), reference)  # nn.Linear [out, in]
    # GPT-2's Conv1D stores [in, out]: blocks still run along the input, as in llama.cpp's transposed tensor
    assert np.array_equal(fmt.fake_quant(w.t().contiguous(), channel_dim=1).numpy(), reference.T)


@pytest.mark.parametrize("name", GGUF_NATIVE)
def test_gguf_formats_store_what_llama_cpp_stores(name):
    fmt = get_format(name)
    w = torch.randn(3, 100)
    assert torch.equal(
        fmt.fake_quant(torch.tensor([0.1234567, -3.0])), torch.tensor([0.1234567, -3.0])
    )  # 1-D: F32
    assert torch.equal(fmt.fake_quant(w, 0), w.half().float())  # rows of 100 are not blocks of 32: F16
    assert fmt.packed_bytes((768,), None) == 4 * 768
    assert fmt.packed_bytes((3, 100), 0) == 2 * 300
    assert fmt.packed_bytes((768, 2304), 1) == 768 * 2304 // 32 * BLOCK_BYTES[name]  # GPT-2 c_attn


@pytest.fixture(scope="module")
def bundled():
    cfg = model_cfg("gpt2", path=str(ROOT / "qsweep" / "assets" / "tiny"))
    model = load_model(cfg)
    return model, load_tokenizer(cfg), unit_table(model, cfg)


def _expected(model, table, plan) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {
        p.name: get_format(plan[u.name]).fake_quant(params[p.name].detach(), p.channel_dim)
        for u in table
        for p in u.params
    }


def _mixed_gguf_plan(table) -> Plan:
    """Every format GGUF accepts, spread over the units (wte q4_0 is also the tied output matrix)."""
    names = [n for n in table.names if "ln" not in n]
    formats = {u: GGUF_ACCEPTS[i % len(GGUF_ACCEPTS)] for i, u in enumerate(names)}
    return Plan({u: formats.get(u, "fp32") for u in table.names})


@pytest.fixture(scope="module")
def mixed_export(bundled, tmp_path_factory):
    model, tok, table = bundled
    plan = _mixed_gguf_plan(table)
    return plan, write_gguf(model, tok, table, plan, tmp_path_factory.mktemp("gguf") / "mixed.gguf")


@needs_gguf
def test_gguf_export_dequantizes_to_the_simulated_weights_unit_by_unit(bundled, mixed_export):
    model, _, table = bundled
    plan, result = mixed_export
    back = read_gguf(result.path)
    assert back.plan == plan
    diffs = verify_tensors(_expected(model, table, plan), back.tensors, table)
    assert set(diffs) == set(table.names) and set(diffs.values()) == {0.0}
    # the file holds the types the plan says: c_attn in the unit's block type, its bias F32, the tied wte once
    fmt = plan["h.0.attn"]
    weight = model.get_parameter("transformer.h.0.attn.c_attn.weight")  # Conv1D [in, out]: rows of `in`
    stored = {"fp32": "F32", "fp16": "F16"}.get(fmt) or get_format(fmt).storage(tuple(weight.t().shape), 0)
    assert back.types["transformer.h.0.attn.c_attn.weight"] == stored
    assert back.types["transformer.h.0.attn.c_attn.bias"] == "F32"
    assert "lm_head.weight" not in back.tensors


@needs_gguf
def test_gguf_tensor_bytes_equal_the_predicted_packed_size(bundled, mixed_export):
    _, _, table = bundled
    plan, result = mixed_export
    assert result.predicted_bytes == packed_size_bytes(table, plan)
    # only the fp16/bf16 units' 1-D tensors are stored wider (F32, as llama.cpp computes with them)
    widened = sum(
        2 * p.numel for u in table if plan[u.name] in ("fp16", "bf16") for p in u.params if len(p.shape) == 1
    )
    assert widened > 0 and result.widened_bytes == widened
    assert result.tensor_bytes == result.predicted_bytes + widened
    # the rest of the file is the header and metadata (mostly the 8,192-token vocabulary and its merges)
    assert (
        0 < result.overhead_bytes < 400_000
        and result.file_bytes == result.tensor_bytes + result.overhead_bytes
    )


@needs_gguf
def test_uniform_q4_0_file_is_the_predicted_size_plus_metadata(bundled, tmp_path):
    model, tok, table = bundled
    plan = Plan.uniform(table, "q4_0")
    result = write_gguf(model, tok, table, plan, tmp_path / "q4_0.gguf")
    assert result.tensor_bytes == result.predicted_bytes == 2_016_256 and result.widened_bytes == 0
    assert (
        result.file_bytes
        == (tmp_path / "q4_0.gguf").stat().st_size
        == result.predicted_bytes + result.overhead_bytes
    )


@needs_gguf
def test_truncated_or_corrupted_gguf_is_one_clear_error(mixed_export, tmp_path):
    _, result = mixed_export
    data = bytearray(Path(result.path).read_bytes())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        ExportError, match=r"^GGUF file '.*cut\.gguf' is truncated or corrupted \(.*\); export it again$"
    ):
        read_gguf(cut)
    data[-5000] ^= 0x40  # one bit of one weight
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(
        ExportError,
        match=r"^GGUF file '.*bad\.gguf' is corrupted: its tensor data does not match its SHA-256",
    ):
        read_gguf(bad)


@needs_gguf
def test_gguf_refuses_a_format_it_cannot_store_naming_the_unit(bundled, tmp_path):
    model, tok, table = bundled
    plan = Plan({**Plan.uniform(table, "q8_0").formats, "h.3.mlp": "int4_g32"})
    with pytest.raises(ExportError) as err:
        write_gguf(model, tok, table, plan, tmp_path / "x.gguf")
    assert str(err.value) == (
        "export target gguf cannot store unit 'h.3.mlp' as int4_g32; gguf accepts: q8_0, q4_0, q4_1, q5_0, q5_1, "
        "q2_K, q3_K, q4_K, q5_K, q6_K, fp32, fp16, bf16"
    )
    assert not list(tmp_path.iterdir())  # refused before anything is written


@needs_gguf
def test_gguf_refuses_other_architectures(tmp_path):
    model = tiny_model("opt")
    table = unit_table(model, model_cfg("opt"))
    with pytest.raises(ExportError, match=r"writes gpt2, llama, mistral, qwen2 models; this model is 'opt'"):
        write_gguf(model, None, table, Plan.uniform(table, "q8_0"), tmp_path / "x.gguf")


# -- Llama-family GGUF (issue 21) ---------------------------------------------------------------------------------


def _llama(tied: bool, tok):
    """A random-init Llama with GQA (4 heads, 2 key/value heads) and rows of 256 and 512 (K-quants apply)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    conf = LlamaConfig(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=512, vocab_size=len(tok), max_position_embeddings=256,
                       tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    model = LlamaForCausalLM(conf).float().eval()
    # twice the init's 0.02: quantization errors that show in the perplexity
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(2)
    return model, unit_table(model, model_cfg("llama"))


def _llama_plans(table) -> dict[str, Plan]:
    names = [n for n in table.names if "norm" not in n]
    mixed = ["q4_K", "q6_K", "q8_0", "q5_K", "q4_0", "q3_K", "q2_K", "fp16", "q5_1"]
    return {"fp32": Plan.uniform(table, "fp32"), "q8_0": Plan.uniform(table, "q8_0"), "q4_0": Plan.uniform(table, "q4_0"),
            "q4_K": Plan.uniform(table, "q4_K"),
            "mixed": Plan({u: mixed[names.index(u) % len(mixed)] if u in names else "fp32" for u in table.names})}  # fmt: skip


@pytest.fixture(scope="module")
def llama_ids():
    from conftest import _corpus_docs, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    ids = torch.tensor(tok("\n\n".join(_corpus_docs()[40:44]))["input_ids"][:1024])
    return tok, ids


@needs_gguf
@needs_llama
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_family_gguf_loads_in_llama_cpp_at_the_simulated_perplexity(tied, llama_ids, tmp_path):
    """Llama (GQA; untied and tied head) as fp32, q8_0, q4_0, q4_K and a mixed plan of nine GGUF types: the file reads
    back to the simulated weights (Q/K rows un-permuted), holds the predicted bytes, and llama.cpp's perplexity on the
    same windows is the simulated one within 0.01% (fp32) and export.tolerance, 0.2% (quantized)."""
    import copy

    tok, ids = llama_ids
    model, table = _llama(tied, tok)
    assert ("lm_head" in table.names) is not tied
    ev = Evaluator(ids, 128, 128, device="cpu")
    for name, plan in _llama_plans(table).items():
        result = write_gguf(model, tok, table, plan, tmp_path / f"{name}.gguf")
        back = read_gguf(result.path)
        assert set(verify_tensors(_expected(model, table, plan), back.tensors, table).values()) == {0.0}, name
        assert result.tensor_bytes == result.predicted_bytes + result.widened_bytes
        assert ("lm_head.weight" in back.tensors) is not tied
        simulated = ev.evaluate(apply_plan_(copy.deepcopy(model), plan, table))
        runtime = gguf_perplexity(result.path, ids, 128, 128, threads=1)
        assert runtime.n_tokens == simulated.n_tokens
        # fp32 weights: llama.cpp's float arithmetic alone (1e-5 measured); quantized weights: it also rounds the
        # activations to 8 bits in its quantized dot products (Q8_0 / Q8_K): up to 1.2e-3 measured here, within
        # export.tolerance (0.002), the bound the export's own check applies
        tolerance = 1e-4 if name == "fp32" else 2e-3
        assert runtime.perplexity == pytest.approx(simulated.perplexity, rel=tolerance), name


# -- compressed-tensors -----------------------------------------------------------------------------------------


def _compressed_plan(table, arch: str) -> Plan:
    """Mixed: int8 per channel, int4 groups of 32, per-tensor int8, fp16 - over Linear units; the rest fp32/fp16."""
    spec = {"default": "fp32", "rules": [
        {"pattern": r"layers\.0\.attn", "format": "int8_channel"},
        {"pattern": r"layers\.1\.attn", "format": "int4_g32"},
        {"pattern": r"layers\.0\.mlp", "format": "int8"},
        {"pattern": r"layers\.1\.mlp", "format": "fp16"},
    ]}  # fmt: skip
    return PlanSpec.from_dict(spec).resolve(table)


@pytest.mark.extras  # compressed-tensors, below
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_compressed_tensors_export_loads_in_transformers_with_the_simulated_weights(arch, tmp_path):
    pytest.importorskip("compressed_tensors", reason=f"needs compressed-tensors (the export extra): {EXTRA}")
    from qsweep.export.compressed import read_compressed, write_compressed

    model = tiny_model(arch)
    table = unit_table(model, model_cfg(arch))
    plan = _compressed_plan(table, arch)
    result = write_compressed(model, None, table, plan, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert (
        config["format"] == "pack-quantized" and len(config["config_groups"]) == 3
    )  # a mixed-precision checkpoint
    assert result.tensor_bytes == result.predicted_bytes + result.widened_bytes
    loaded, plan_back = read_compressed(result.path)
    assert plan_back == plan
    reference = tiny_model(arch)
    apply_plan_(reference, plan, table)
    diffs = verify_tensors(dict(reference.named_parameters()), dict(loaded.named_parameters()), table)
    assert set(diffs.values()) == {0.0}
    ids = torch.randint(0, model.config.vocab_size, (600,), generator=torch.Generator().manual_seed(0))
    ev = Evaluator(ids, 64, 32, device="cpu")
    assert ev.evaluate(loaded).nll_sum == ev.evaluate(reference).nll_sum  # same weights, same kernels: exact


@pytest.mark.extras  # compressed-tensors, below
def test_compressed_tensors_refusals_name_the_unit(tmp_path):
    pytest.importorskip("compressed_tensors", reason=f"needs compressed-tensors (the export extra): {EXTRA}")
    from qsweep.export.compressed import read_compressed, write_compressed

    model = tiny_model("opt")
    table = unit_table(model, model_cfg("opt"))
    base = _compressed_plan(table, "opt").formats
    with pytest.raises(
        ExportError,
        match=r"^export target compressed cannot store unit 'embed_tokens' as int8_channel: embeddings and lm_head stay unquantized",
    ):
        write_compressed(model, None, table, Plan({**base, "embed_tokens": "int8_channel"}), tmp_path / "a")
    with pytest.raises(
        ExportError,
        match=r"^export target compressed cannot store unit 'layers.0.attn' as int4; compressed accepts: fp32, fp16, bf16, int8, int8_channel",
    ):
        write_compressed(model, None, table, Plan({**base, "layers.0.attn": "int4"}), tmp_path / "b")
    with pytest.raises(
        ExportError, match=r"cannot store unit 'layers.0.attn_norm' as int8: .*nn.Linear layers only"
    ):
        write_compressed(model, None, table, Plan({**base, "layers.0.attn_norm": "int8"}), tmp_path / "c")
    result = write_compressed(model, None, table, Plan(base), tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(
        ExportError, match=r"^compressed-tensors export '.*ok' is corrupted: model.safetensors does not match"
    ):
        read_compressed(result.path)


# -- real runtime: llama.cpp --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_ids(bundled):
    """The first 2,048 token ids of the bundled corpus's test split (the shared token cache, as the CLI uses)."""
    import os

    import yaml

    from qsweep.data import load_token_ids

    data_cfg = yaml.safe_load((ROOT / "conf" / "data" / "tiny.yaml").read_text())
    data_cfg["cache_dir"] = os.environ.get("QSWEEP_CACHE", "~/.cache/qsweep")
    return load_token_ids(data_cfg, "test", bundled[1])[:2048]


@needs_gguf
@needs_llama
@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_K", "q6_K"])
def test_llama_cpp_perplexity_matches_the_simulation(bundled, bundled_ids, tmp_path, name):
    """llama.cpp on the exported file vs qsweep's simulation, same 8 windows of 256 token ids (README "Export")."""
    import copy

    model, tok, table = bundled
    plan = Plan.uniform(table, name)
    path = write_gguf(model, tok, table, plan, tmp_path / f"{name}.gguf").path
    ev = Evaluator(bundled_ids, 256, 256, device="cpu")
    simulated = ev.evaluate(apply_plan_(copy.deepcopy(model), plan, table))
    # one thread: on a busy 2-core machine OpenMP's spinning threads make 2 threads 10x slower than 1
    runtime = gguf_perplexity(path, bundled_ids, 256, 256, threads=1)
    assert runtime.n_tokens == simulated.n_tokens == 2040
    assert runtime.perplexity == pytest.approx(simulated.perplexity, rel=2e-3)


# -- the command line ---------------------------------------------------------------------------------------------


@needs_gguf
@pytest.mark.slow
def test_cli_exports_verifies_and_measures(tmp_path, tiny_dirs):
    runtime = "true" if llama_cpp_missing() is None else "false"
    proc = run_qsweep(*tiny_overrides(tiny_dirs), "+export=gguf", "plan=q4_0", "eval.max_tokens=400",
                      f"export.runtime={runtime}", f"export.path={tmp_path / 'out'}", tmp_path=tmp_path)  # fmt: skip
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["units_verified"] == 51 and row["tensor_bytes"] == row["predicted_bytes"]
    assert (tmp_path / "out" / f"model-{row['plan_digest']}.gguf").stat().st_size == row["file_bytes"]
    if runtime == "true":
        assert row["within_tolerance"] is True, row


@needs_gguf
@pytest.mark.slow
def test_cli_refuses_a_plan_the_target_cannot_store(tmp_path, tiny_dirs):
    proc = run_qsweep(*tiny_overrides(tiny_dirs), "+export=gguf", "plan=int8", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "qsweep: error: export target gguf cannot store unit 'wte' as int8; gguf accepts: q8_0, q4_0, q4_1, q5_0, "
        "q5_1, q2_K, q3_K, q4_K, q5_K, q6_K, fp32, fp16, bf16"
    )


# -- llama.cpp in a child process, loaded the same way on every x86 CPU (issue 24) --------------------------------


def _cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@needs_llama
@pytest.mark.skipif(not _cpu_has_amx(), reason="this CPU has no AMX (no amx_int8 in /proc/cpuinfo): llama.cpp's AMX "
                    "kernel, which segfaults on batches of 2+ tokens, cannot run here")  # fmt: skip
@needs_gguf
@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_llama_cpp_runs_quantized_batches_on_an_amx_cpu(bundled, bundled_ids, tmp_path, name):
    """On AMX, with the extra buffer types on, this crashed (SIGSEGV in ggml_backend_amx_mul_mat)."""
    model, tok, table = bundled
    plan = Plan.uniform(table, name)
    path = write_gguf(model, tok, table, plan, tmp_path / f"{name}.gguf").path
    runtime = gguf_perplexity(path, bundled_ids[:512], 256, 256, threads=2)
    simulated = Evaluator(bundled_ids[:512], 256, 256, device="cpu").evaluate(apply_plan_(model, plan, table))
    apply_plan_(model, Plan.uniform(table, "fp32"), table)
    assert runtime.perplexity == pytest.approx(simulated.perplexity, rel=2e-3)


@needs_gguf
@needs_llama
def test_the_runtime_check_loads_no_repacked_or_amx_weights(bundled, tmp_path):
    """llama_child loads with ``use_extra_bufts = False``: llama.cpp's load log names no CPU_REPACK or AMX buffer
    (with them on, an x86 CPU with AVX2 repacks Q4_0 into a CPU_REPACK buffer; one with AMX uses an AMX one)."""
    import subprocess
    import sys

    model, tok, table = bundled
    path = write_gguf(model, tok, table, Plan.uniform(table, "q4_0"), tmp_path / "q4_0.gguf").path
    request = {"model": str(path), "ids": list(range(1, 9)), "windows": [[0, 8, 7]], "context": 8, "threads": 1,
               "verbose": True}  # fmt: skip
    (tmp_path / "req.json").write_text(json.dumps(request))
    child = ROOT / "qsweep" / "export" / "llama_child.py"
    proc = subprocess.run([sys.executable, str(child), str(tmp_path / "req.json"), str(tmp_path / "res.json")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    buffers = [line for line in proc.stderr.splitlines() if "model buffer size" in line]
    assert buffers and not [b for b in buffers if "REPACK" in b or "AMX" in b], buffers
    assert len(json.loads((tmp_path / "res.json").read_text())["window_nll"]) == 1


@needs_gguf
@needs_llama
def test_a_crashing_runtime_is_one_line_and_the_export_is_kept(tiny_dirs, tmp_path, monkeypatch, caplog):
    """A native crash in the runtime check (here: the child process kills itself with SIGSEGV as Python starts,
    through a sitecustomize on its PYTHONPATH) ends the check, not the export: the file stays, export.json and the
    returned record say why there is no runtime perplexity, in one line."""
    from conftest import compose_config

    from qsweep.export.cli import export_one

    hook = tmp_path / "crash"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    cfg = compose_config(*tiny_overrides(tiny_dirs), "+export=gguf", "plan=q8_0", "eval.max_tokens=200",
                         f"export.path={tmp_path / 'out'}", tmp_path=tmp_path)  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(hook))  # the child's environment only: this process has started
    row = export_one(cfg, tmp_path)
    assert (
        row["error"].startswith("llama.cpp crashed (SIGSEGV) evaluating 'model-") and "\n" not in row["error"]
    )
    assert row["runtime_perplexity"] is None and row["simulated_perplexity"] > 0
    assert (tmp_path / "out" / f"model-{row['plan_digest']}.gguf").stat().st_size == row["file_bytes"]
    assert json.loads((tmp_path / "export.json").read_text())["error"] == row["error"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [row["error"]]


# -- where an export goes (issue 21) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "is a file: name a directory"),
        ("under_a_file", "which is a file: name a directory"),
        ("proc", "cannot be written"),
    ],
)
def test_a_bad_export_path_is_one_line_before_the_model_loads(
    tiny_dirs, tmp_path, monkeypatch, where, message
):
    """export.path a file, under a file, or somewhere nothing can be written (/proc, even as root): one line, and
    the model is never loaded (EvalSession is not reached)."""
    from conftest import compose_config

    import qsweep.export.cli as cli

    (tmp_path / "a_file").write_text("x")
    path = {
        "file": tmp_path / "a_file",
        "under_a_file": tmp_path / "a_file" / "sub",
        "proc": "/proc/qsweep-x",
    }[where]
    cfg = compose_config(*tiny_overrides(tiny_dirs), "+export=gguf", "plan=q8_0", f"export.path={path}",
                         tmp_path=tmp_path)  # fmt: skip
    monkeypatch.setattr(cli, "EvalSession", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ExportError, match=message) as e:
        cli.export_one(cfg, tmp_path)
    assert f"export.path={path}" in str(e.value) and "\n" not in str(e.value)


@needs_gguf
def test_an_existing_export_is_replaced_only_when_asked_and_names_the_model_not_a_path(tiny_dirs, tmp_path):
    import gguf
    from conftest import compose_config

    from qsweep.export.cli import export_one

    args = [*tiny_overrides(tiny_dirs), "+export=gguf", "plan=q8_0", "export.runtime=false", "eval.max_tokens=200",
            f"export.path={tmp_path / 'out'}"]  # fmt: skip
    row = export_one(compose_config(*args, tmp_path=tmp_path), tmp_path)
    with pytest.raises(
        ExportError, match=r"exists \(this plan was exported there before\): pass export.overwrite"
    ):
        export_one(compose_config(*args, tmp_path=tmp_path), tmp_path)
    again = export_one(compose_config(*args, "export.overwrite=true", tmp_path=tmp_path), tmp_path)
    assert again["file_bytes"] == row["file_bytes"] and again["path"] == row["path"]
    name = gguf.GGUFReader(row["path"]).get_field("general.name").contents()
    model_dir = next(a.split("=", 1)[1] for a in tiny_overrides(tiny_dirs) if a.startswith("model.path="))
    assert name == Path(model_dir).name and "/" not in name


@needs_gguf
def test_a_sentencepiece_style_vocabulary_is_refused_in_one_line():
    """Llama 2 / Mistral tokenizers are BPE without byte-level pre-tokenization: written as GPT-2's vocabulary,
    llama.cpp would split text differently, so the export refuses them."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qsweep.export.gguf import _vocab

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(
        ExportError, match=r"byte-level BPE vocabularies .*; this tokenizer is a BPE without byte-level"
    ):
        _vocab(gguf, PreTrainedTokenizerFast(tokenizer_object=bpe), 3)
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert _vocab(gguf, PreTrainedTokenizerFast(tokenizer_object=bpe), 4)[0] == ["a", "b", "ab", "[PAD3]"]


# -- plans as llama-quantize recipes (issue 21) -------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_quantize(tmp_path_factory) -> str:
    """llama.cpp's llama-quantize: $QSWEEP_LLAMA_QUANTIZE, one on PATH, or built (cmake, ~10 min on 2 cores) from the
    llama.cpp source vendored in the installed llama-cpp-python's source distribution, cached in the qsweep cache."""
    import shutil
    import subprocess
    import sys
    import tarfile
    from importlib.metadata import version

    found = os.environ.get("QSWEEP_LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if found:
        return found
    ver = version("llama-cpp-python")
    root = Path(os.environ.get("QSWEEP_CACHE", "~/.cache/qsweep")).expanduser() / f"llama-quantize-{ver}"
    binary = root / "build" / "bin" / "llama-quantize"
    if binary.is_file():
        return str(binary)
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake to build llama-quantize (apt-get install cmake)")
    root.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                          f"llama-cpp-python=={ver}", "-d", str(root)], capture_output=True, text=True)  # fmt: skip
    if got.returncode != 0:
        pytest.skip(
            f"cannot download llama-cpp-python {ver}'s source to build llama-quantize: {got.stderr[-300:]}"
        )
    with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as tar:
        tar.extractall(root, filter="data")
    src = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_OPENMP=OFF"]  # fmt: skip
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(root / "build"), *flags], check=True, capture_output=True
    )
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-quantize", "-j", str(os.cpu_count())],
                   check=True, capture_output=True)  # fmt: skip
    return str(binary)


def _recipe_plan(table) -> Plan:
    """Quantized types over the 2-D units (K-quants, legacy blocks), norms and GPT-2's position embeddings fp32."""
    mixed = ["q4_K", "q6_K", "q8_0", "q5_K", "q4_0", "q3_K", "q2_K", "q5_1", "q4_1"]
    names = [n for n in table.names if "norm" not in n and "ln" not in n and n != "wpe"]
    return Plan({u: mixed[names.index(u) % len(mixed)] if u in names else "fp32" for u in table.names})


@needs_gguf
@needs_llama
@pytest.mark.slow  # builds llama-quantize the first time (~10 min on 2 cores)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_recipe_makes_llama_quantize_write_the_plan(family, llama_quantize, bundled, bundled_ids, llama_ids,
                                                      tmp_path):  # fmt: skip
    """The recipe applied by llama-quantize to an F32 GGUF gives every tensor the planned type and the very bytes of
    qsweep's own export of the plan, so llama.cpp's perplexity is the simulated one (GPT-2 names on the bundled model,
    whose 128-wide rows take llama-quantize's fallbacks; Llama names on a random-init GQA Llama)."""
    import copy
    import subprocess

    import gguf

    from qsweep.export.recipe import write_recipe

    if family == "gpt2":
        model, tok, table = bundled
        ids, ctx = bundled_ids, 256
    else:
        tok, ids = llama_ids
        (model, table), ctx = _llama(False, tok), 128
    plan = _recipe_plan(table)
    source = write_gguf(model, tok, table, Plan.uniform(table, "fp32"), tmp_path / "f32.gguf").path
    recipe = write_recipe(model, table, plan, tmp_path / "recipe.txt")
    assert not recipe.kept and len(recipe.tensor_types) > 10
    out = tmp_path / "quantized.gguf"
    subprocess.run([llama_quantize, "--tensor-type-file", recipe.path, source, str(out), "q8_0"], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    ours = {
        t.name: t
        for t in gguf.GGUFReader(write_gguf(model, tok, table, plan, tmp_path / "ours.gguf").path).tensors
    }
    theirs = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(theirs) == set(ours)
    for name, t in ours.items():
        assert theirs[name].tensor_type == t.tensor_type, name
        assert np.array_equal(theirs[name].data, t.data), name
    quantized = {t.tensor_type.name for t in ours.values()}
    # GPT-2: 128-wide rows take llama-quantize's fallbacks (q5_0, q8_0, q4_0); the 512-wide MLP projections K-quants
    expected = (
        {"Q4_K", "Q6_K", "Q5_K", "Q3_K"} if family == "llama" else {"Q5_0", "Q8_0", "Q4_0", "Q2_K", "Q6_K"}
    )
    assert expected <= quantized
    simulated = Evaluator(ids, ctx, ctx, device="cpu").evaluate(
        apply_plan_(copy.deepcopy(model), plan, table)
    )
    runtime = gguf_perplexity(out, ids, ctx, ctx, threads=1)
    assert runtime.perplexity == pytest.approx(simulated.perplexity, rel=2e-3)


@needs_gguf
def test_the_recipe_target_writes_one_type_per_quantizable_tensor_without_loading_weights(
    tiny_dirs, tmp_path, monkeypatch
):
    """``+export=recipe`` builds the model on the meta device (a 70B model's recipe needs no memory for it): every
    2-D tensor but GPT-2's position embeddings gets a line; what the plan asks and llama-quantize cannot do is listed."""
    from conftest import compose_config

    import qsweep.export.cli as cli

    monkeypatch.setattr(cli, "EvalSession", lambda cfg: pytest.fail("the model was loaded"))
    cfg = compose_config(*tiny_overrides(tiny_dirs), "+export=recipe", "plan=q8_0", f"export.path={tmp_path / 'r'}",
                         tmp_path=tmp_path)  # fmt: skip
    row = cli.export_one(cfg, tmp_path)
    lines = (tmp_path / "r" / f"recipe-{row['plan_digest']}.txt").read_text().split()
    # 12 blocks x (attn_qkv, attn_output, ffn_up, ffn_down) + token_embd; rows of 32: q8_0 throughout
    assert len(lines) == row["tensors"] == 49 and row["types"] == {"q8_0": 49}
    assert lines[0] == r"^token_embd\.weight$=q8_0" and r"^blk\.11\.ffn_down\.weight$=q8_0" in lines
    assert row["kept"] == {
        "position_embd.weight": "planned q8_0 (Q8_0); llama-quantize keeps it as in the source"
    }
    assert row["command"].startswith(f"llama-quantize --tensor-type-file recipe-{row['plan_digest']}.txt ")
