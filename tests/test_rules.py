"""OrderedRules (the one reader of ordered regex rules) and the did-you-mean helper: semantics and exact messages."""

from __future__ import annotations

import pytest

from qsweep.errors import ConfigError, QsweepError, did_you_mean
from qsweep.rules import OrderedRules, RuleError

NAMES = ["wte", "wpe", "h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp", "ln_f"]


def _rules(*pairs, **kw) -> OrderedRules[str]:
    return OrderedRules.compile(pairs, **kw)


def test_first_match_wins_by_fullmatch():
    rules = _rules((r"h\.0\..*", "a"), (r"h\..*", "b"), ("w.e", "c"), ("h", "never: fullmatch, not search"))
    assert [(n, (hit.index, hit.value) if (hit := rules.first(n)) else None) for n in NAMES] == [
        ("wte", (2, "c")), ("wpe", (2, "c")), ("h.0.attn", (0, "a")), ("h.0.mlp", (0, "a")),
        ("h.1.attn", (1, "b")), ("h.1.mlp", (1, "b")), ("ln_f", None),
    ]  # fmt: skip
    assert [m.index for m in rules.all_matches("h.0.mlp")] == [0, 1]
    assert rules.first("h.0.mlp").match.group(0) == "h.0.mlp"


def test_only_allows_exactly_one_match():
    rules = _rules((r"h\.(\d+)\.attn", "attn"), (r"h\.\d+\..*", "block"), ("wte", "emb"), what="unit rule")
    assert rules.only("wte").value == "emb" and rules.only("ln_f") is None
    assert rules.only("h.1.mlp").value == "block"
    with pytest.raises(
        RuleError, match=r"^parameter 'h\.0\.attn' is matched by more than one unit rule: 'h\\\\.\(\\\\d\+\)"
    ):
        rules.only("h.0.attn", subject="parameter")


def test_unused_rules_are_named_with_a_close_name():
    rules = _rules(("wte", 1), (r"h\.\d\.mlp", 2), ("h.0.atn", 3), ("decoder", 4), source="plan 'x'")
    assert rules.unused(NAMES) == ["h.0.atn", "decoder"]  # shadowed or not, a rule that matches is used
    with pytest.raises(
        RuleError,
        match=r"^plan 'x': rule pattern 'h\.0\.atn' matches no unit \(did you mean h\.0\.attn.*\?\)$",
    ):
        rules.check_used(NAMES, subject="unit")
    rules.check_used(["wte", "h.3.mlp", "h.0.atn", "decoder"])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"pattern": "wte", "format": "fp16"}, "wpe"],
         r"^src: rule 1 must be a mapping with keys 'pattern' and 'format', got 'wpe'$"),
        ([{"pattern": "wte", "fmt": "fp16"}], r"^src: rule 0 must be a mapping with keys 'pattern' and 'format'"),
        ([{"pattern": "wte", "format": "fp16", "extra": 1}], r"^src: rule 0 must be a mapping"),
        ([{"pattern": "[", "format": "fp16"}], r"^src: rule 0 pattern '\[' is not a valid regex: "),
        ({"pattern": "wte", "format": "fp16"}, r"^src: expected a list of \{pattern, format\} mappings"),
        ([{"pattern": "wte", "format": "fp61"}], r"^src: rule 0: bad value 'fp61'$"),
    ],
)  # fmt: skip
def test_from_config_validates_every_entry_with_the_callers_error(entries, message):
    class MyError(QsweepError, ValueError):
        pass

    def convert(value, where):
        if value != "fp16":
            raise MyError(f"{where}: bad value {value!r}")
        return value

    with pytest.raises(MyError, match=message) as info:
        OrderedRules.from_config(entries, "format", source="src", error=MyError, convert=convert)
    assert "\n" not in str(info.value)


def test_from_config_keeps_order_and_converted_values():
    rules = OrderedRules.from_config(
        [{"pattern": "w.e", "unit": 1}, {"pattern": ".*", "unit": 2}], "unit", convert=lambda v, where: str(v)
    )
    assert list(rules) == [("w.e", "1"), (".*", "2")] and rules.patterns == ["w.e", ".*"] and len(rules) == 2
    assert OrderedRules.from_config(None, "unit").first("x") is None  # no rules: nothing matches


def test_did_you_mean():
    assert did_you_mean("fp61", ["fp32", "fp16", "bf16", "int8"]) == " (did you mean fp16?)"
    assert did_you_mean("int4_g12", ["int4_g128", "int4_g32", "int3_g128", "fp16"], n=2) == (
        " (did you mean int4_g128 or int4_g32?)"
    )
    assert did_you_mean("zzz", ["fp32", "fp16"]) == ""
    assert did_you_mean(None, ["fp32"]) == ""


def test_config_errors_name_a_close_match():
    from qsweep.config import _asset_dir
    from qsweep.search.samplers import make_sampler

    with pytest.raises(
        ConfigError, match=r"^unknown search.sampler 'nsga' \(did you mean nsga2\?\); valid: nsga2, tpe"
    ):
        make_sampler("nsga", seed=0)
    with pytest.raises(ConfigError, match=r"^bad search.sampler_options for random: "):
        make_sampler("random", seed=0, options={"population_size": 4})
    with pytest.raises(
        ConfigError, match=r"^no bundled asset 'tinny' \(did you mean tiny\?\); bundled: tiny$"
    ):
        _asset_dir("tinny")
