"""Unit discovery: every parameter in exactly one unit, tied weights once, rules from the model configs."""

from __future__ import annotations

import pytest
import torch
from conftest import model_cfg, tiny_model

from qsweep.errors import ConfigError, QsweepError
from qsweep.model import meta_model, unit_rules, unit_table
from qsweep.units import UnitError, UnitRule, discover_units

ARCHS = ["gpt2", "opt", "llama"]


def _check_partition(model, table):
    names = [n for n, _ in model.named_parameters()]  # tied parameters listed once
    claimed = [p.name for u in table for p in u.params]
    assert sorted(claimed) == sorted(names)
    assert len(claimed) == len(set(claimed))
    assert table.numel == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["component", "linear", "block"])
def test_every_parameter_in_exactly_one_unit(arch, granularity):
    model = tiny_model(arch)
    table = unit_table(model, model_cfg(arch, granularity=granularity))
    _check_partition(model, table)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_tied_lm_head_counted_once_in_the_embedding_unit(arch):
    model = tiny_model(arch)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    table = unit_table(model, model_cfg(arch))
    assert "lm_head" not in table
    emb = table["wte" if arch == "gpt2" else "embed_tokens"]
    assert [p.name for p in emb.params] == [
        "transformer.wte.weight" if arch == "gpt2" else "model.decoder.embed_tokens.weight"
    ]


def test_untied_lm_head_is_its_own_unit():
    model = tiny_model("llama")
    table = unit_table(model, model_cfg("llama"))
    assert "lm_head" in table and "embed_tokens" in table


def test_gpt2_small_units_from_config_alone(gpt2_small_table):
    t = gpt2_small_table
    assert t.numel == 124_439_808
    assert len(t) == 2 + 12 * 4 + 1
    assert t.names[:6] == ["wte", "wpe", "h.0.ln_1", "h.0.attn", "h.0.ln_2", "h.0.mlp"]
    attn = t["h.0.attn"]
    assert {p.name.split(".", 3)[-1]: p.shape for p in attn.params} == {
        "attn.c_attn.weight": (768, 2304),
        "attn.c_attn.bias": (2304,),
        "attn.c_proj.weight": (768, 768),
        "attn.c_proj.bias": (768,),
    }
    # Conv1D is [in, out]: the output channel is dim 1; embeddings' rows are outputs of the tied lm_head
    assert attn.params[0].channel_dim == 1 and attn.params[1].channel_dim is None
    assert t["wte"].params[0].channel_dim == 0


def test_linear_granularity_channel_dims():
    model = tiny_model("llama")
    table = unit_table(model, model_cfg("llama", granularity="linear"))
    q = table["layers.0.attn.q_proj"].params[0]
    assert q.channel_dim == 0  # nn.Linear is [out, in]


def test_meta_model_has_no_storage():
    from transformers import GPT2Config

    m = meta_model(GPT2Config(n_layer=1))
    assert all(p.device == torch.device("meta") for p in m.parameters())


def test_unclaimed_parameter_is_named():
    model = tiny_model("gpt2")
    rules = [r for r in unit_rules(model_cfg("gpt2")) if r["unit"] != "ln_f"]
    with pytest.raises(UnitError, match=r"parameter 'transformer\.ln_f\.weight' is claimed by no unit rule"):
        discover_units(model, rules)


def test_doubly_claimed_parameter_is_named():
    model = tiny_model("gpt2")
    rules = [*unit_rules(model_cfg("gpt2")), {"pattern": r"transformer\.wpe\..+", "unit": "pos"}]
    with pytest.raises(
        UnitError,
        match=r"^parameter 'transformer\.wpe\.weight' is matched by more than one unit rule: "
        r"'transformer\\\\.wpe\\\\.weight', 'transformer\\\\.wpe\\\\..\+'$",
    ):
        discover_units(model, rules)


def test_unknown_granularity_lists_valid_ones():
    with pytest.raises(
        ConfigError,
        match=r"^unknown model.granularity 'blocks' \(did you mean block\?\); valid: component, linear, block$",
    ):
        unit_rules(model_cfg("gpt2", granularity="blocks"))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([], r"no unit rules given"),
        ([{"pattern": "(", "unit": "x"}], r"^unit rule 0 pattern '\(' is not a valid regex"),
        ([{"pattern": ".*", "name": "x"}], r"^unit rule 0 must be a mapping with keys 'pattern' and 'unit'"),
        ([{"pattern": r"transformer\.(\w+)\..*", "unit": r"\2"}],
         r"unit rule 0 \('transformer.*'\): unit name template '\\\\2' does not fit the pattern's groups"),
    ],
)  # fmt: skip
def test_bad_unit_rules_give_one_line(rules, message):
    with pytest.raises(UnitError, match=message) as info:
        discover_units(tiny_model("gpt2"), rules)
    assert isinstance(info.value, QsweepError) and "\n" not in str(info.value)


def test_unit_rules_may_claim_nothing_and_templates_use_groups():
    """Rules serve a model family: one matching no parameter (an untied lm_head) is fine; groups name units."""
    model = tiny_model("gpt2")
    rules = [
        UnitRule(r"transformer\.h\.(\d+)\.(\w+)\..+", r"block\1.\2"),
        UnitRule(r"(transformer\.)?(\w+)\.weight|transformer\.ln_f\.bias", "rest"),
        UnitRule(r"decoder\..+", "never"),
    ]
    table = discover_units(model, rules)
    assert table.names == ["rest", "block0.ln_1", "block0.attn", "block0.ln_2", "block0.mlp", "block1.ln_1",
                           "block1.attn", "block1.ln_2", "block1.mlp"]  # fmt: skip
    assert [p.name for p in table["rest"].params] == [
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"
    ]  # fmt: skip
