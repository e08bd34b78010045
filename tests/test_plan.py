"""Plans: rules with a default, explicit units, the seed's format, serialisation, and one-line errors."""

from __future__ import annotations

import json

import pytest

from qsweep.errors import QsweepError
from qsweep.plan import (
    Plan,
    PlanError,
    PlanSpec,
    load_plan_file,
    named_plan_spec,
    plan_from_config,
    plan_names,
)


def test_rules_first_match_wins_then_default(gpt2_small_table):
    spec = PlanSpec.from_dict(
        {
            "default": "int8",
            "rules": [
                {"pattern": ".*ln.*", "format": "fp32"},
                {"pattern": r"h\.(1|2|3)\.mlp", "format": "fp16"},
                {"pattern": r"h\..*", "format": "int4"},
            ],
        }
    )
    plan = spec.resolve(gpt2_small_table)
    assert plan["h.0.ln_1"] == "fp32" and plan["ln_f"] == "fp32"
    assert plan["h.2.mlp"] == "fp16"
    assert plan["h.11.mlp"] == "int4" and plan["h.2.attn"] == "int4"
    assert plan["wte"] == "int8"


def test_explicit_units_override_rules(gpt2_small_table):
    plan = PlanSpec.from_dict({"default": "int8", "units": {"wte": "fp16"}}).resolve(gpt2_small_table)
    assert plan["wte"] == "fp16" and plan["wpe"] == "int8"


def test_save_load_roundtrip_yaml_and_json(tmp_path, gpt2_small_table):
    plan = plan_from_config(named_plan_spec("attn0_mlp123"), gpt2_small_table)
    for suffix in (".yaml", ".json"):
        path = plan.save(tmp_path / f"p{suffix}")
        loaded = load_plan_file(path, gpt2_small_table)
        assert loaded == plan and loaded.digest() == plan.digest()
    assert json.loads((tmp_path / "p.json").read_text())["version"] == 1


def test_seed_plan_format(tmp_path, gpt2_small_table):
    """{substring: width}: the first pattern contained in a parameter name wins; unmatched stays fp32."""
    seed = {
        "h.1.mlp": 16,
        "h.2.mlp": 16,
        "h.3.mlp": 16,
        "h.11.attn": 16,
        "attn": 8,
        "mlp": 8,
        "wte": 8,
        "wpe": 8,
    }
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed))
    plan = load_plan_file(path, gpt2_small_table)
    ours = plan_from_config(named_plan_spec("attn0_mlp123"), gpt2_small_table)
    assert plan == ours  # LayerNorms unmatched -> fp32, as the seed does


def test_seed_patterns_are_literal_substrings_first_wins(gpt2_small_table):
    """Seed plans go through qsweep.rules like every rule list: a pattern is a literal substring ('.' is a dot,
    '[12]' is brackets), the first contained pattern wins, and only a pattern no parameter name contains is an
    error (one shadowed by an earlier pattern is not, as with regex rules)."""
    plan = plan_from_config({"h.1.": 4, "mlp": 8, "h.0.mlp": 16}, gpt2_small_table)
    assert plan["h.1.attn"] == plan["h.1.ln_2"] == "int4" and plan["h.10.attn"] == plan["h.11.ln_1"] == "fp32"
    assert plan["h.0.mlp"] == "int8" and plan["h.1.mlp"] == "int4" and plan["h.10.mlp"] == "int8"
    with pytest.raises(PlanError, match=r"^plan: pattern 'ln_\[12\]' matches no parameter name$"):
        plan_from_config({"ln_[12]": 8}, gpt2_small_table)


def test_seed_plan_that_splits_a_unit_asks_for_finer_granularity(gpt2_small_table):
    with pytest.raises(PlanError, match=r"several formats.*model.granularity=linear"):
        plan_from_config({"c_attn": 8}, gpt2_small_table)


def test_plan_digest_is_order_independent():
    assert Plan({"a": "fp16", "b": "int8"}).digest() == Plan({"b": "int8", "a": "fp16"}).digest()


def test_histogram(gpt2_small_table):
    plan = Plan.uniform(gpt2_small_table, "int4")
    assert plan.histogram(gpt2_small_table) == {"int4": 124_439_808}


# --- bad input: one clear line naming the problem ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"default": "int5"}, r"plan: default: unknown format 'int5'.*valid formats: fp32"),
        (
            {"default": "int8", "rules": [{"pattern": "h\\.99\\.mlp", "format": "fp16"}]},
            r"^plan: rule pattern 'h\\\\.99\\\\.mlp' matches no unit \(did you mean h.9.mlp, h.8.mlp or h.7.mlp\?\)$",
        ),
        (
            {"default": "int8", "units": {"h.0.atn": "fp16"}},
            r"^plan: unknown unit 'h.0.atn' \(did you mean h.0.attn, h.10.attn or h.9.attn\?\)$",
        ),
        (
            {"rules": [{"pattern": "wte", "format": "fp16"}]},
            r"unit 'wpe' matches no rule and the plan has no default",
        ),
        ({"defualt": "int8"}, r"unknown plan key 'defualt' \(did you mean default\?\)"),
        (
            {"default": "int8", "rules": [{"pattern": "(", "format": "fp16"}]},
            r"rule 0 pattern '\(' is not a valid regex",
        ),
        ({"default": "int8", "rules": ["wte"]}, r"rule 0 must be a mapping with keys 'pattern' and 'format'"),
        ({"version": 2, "default": "int8"}, r"plan version 2 is not supported"),
        ({}, r"the plan is empty"),
    ],
)
def test_bad_plans_give_one_clear_line(raw, message, gpt2_small_table):
    with pytest.raises(PlanError, match=message) as info:
        plan_from_config(raw, gpt2_small_table)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.yaml", "", r"the file is empty"),
        ("blank.json", "  \n", r"the file is empty"),
        ("bad.yaml", "default: [int8\n", r"malformed YAML"),
        ("bad.json", '{"default": "int8",}', r"malformed JSON"),
        ("list.yaml", "- int8\n", r"a plan must be a mapping"),
        ("seed.json", '{"h.0.mlp": 5}', r"pattern 'h.0.mlp' has width 5; valid widths: 32, 16, 8, 4"),
        ("nomatch.json", '{"h.0.mlp": 8, "decoder": 8}', r"pattern 'decoder' matches no parameter name"),
    ],
)
def test_bad_plan_files_give_one_clear_line(tmp_path, name, text, message, gpt2_small_table):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PlanError, match=message) as info:
        load_plan_file(path, gpt2_small_table)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_missing_plan_file(tmp_path, gpt2_small_table):
    with pytest.raises(PlanError, match=r"cannot be read"):
        load_plan_file(tmp_path / "nope.yaml", gpt2_small_table)


def test_plan_errors_are_user_errors():
    assert issubclass(PlanError, QsweepError) and issubclass(PlanError, ValueError)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"default": "int8", "rules": "wte"}, r"^plan: expected a list of \{pattern, format\} mappings"),
        (
            {"default": "int8", "rules": [{"pattern": "wte", "format": "int9"}]},
            r"^plan: rule 0: unknown format 'int9' \(did you mean .*int8.*\?\); valid formats: fp32",
        ),
    ],
)
def test_bad_rules_name_the_rule(raw, message, gpt2_small_table):
    with pytest.raises(PlanError, match=message):
        plan_from_config(raw, gpt2_small_table)


def test_shadowed_rule_is_not_unused(gpt2_small_table):
    """Only a rule matching no unit at all is an error; one that earlier rules or explicit units shadow is not."""
    spec = {
        "default": "int8",
        "rules": [{"pattern": "w.e", "format": "fp16"}, {"pattern": "wte", "format": "int4"}],
        "units": {"wpe": "fp32"},
    }
    plan = plan_from_config(spec, gpt2_small_table)
    assert plan["wte"] == "fp16" and plan["wpe"] == "fp32" and plan["h.0.mlp"] == "int8"


def test_named_plan_catalogue(gpt2_small_table):
    assert set(plan_names()) >= {"fp16", "int8", "attn0_mlp123", "all_int8_attn", "emb_int8_first4"}
    plan = plan_from_config(named_plan_spec("attn0_mlp123"), gpt2_small_table)
    assert plan["h.2.mlp"] == "fp16" and plan["h.11.attn"] == "fp16" and plan["h.0.ln_1"] == "fp32"
    assert plan["h.0.attn"] == "int8"
    with pytest.raises(
        PlanError,
        match=r"^unknown plan name 'atn0_mlp123' \(did you mean attn0_mlp123.*\?\); shipped plans: all_int8_attn, ",
    ):
        named_plan_spec("atn0_mlp123")
    with pytest.raises(PlanError, match=r"unknown plan name '\.\./model/gpt2'"):  # names, never paths
        named_plan_spec("../model/gpt2")
