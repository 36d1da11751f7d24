"""Value readers, number spelling and JSON spans, checked against the parsers they stand in for."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanguard.lint.findings import Finding
from nanguard.lint.fixing import fix_json_text, format_number
from nanguard.lint.jsonspans import index_json
from nanguard.lint.tree import as_bool, as_infinite, as_number, walk

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30)


@given(finite, st.sampled_from([None, True, False]))
def test_format_number_round_trips_through_json_and_float(value, scientific):
    text = format_number(value, scientific=scientific)
    assert float(text) == pytest.approx(value, rel=1e-6, abs=1e-300)
    assert json.loads(text) == pytest.approx(value, rel=1e-6, abs=1e-300)


@given(st.floats(min_value=1e-12, max_value=1e12) | st.floats(min_value=-1e12, max_value=-1e-12))
def test_yaml_spelling_is_a_float_for_yaml_1_1_and_1_2(value):
    from ruamel.yaml import YAML

    text = format_number(value, scientific=True, yaml_1_1_safe=True)
    assert "." in text and ("e-" in text or "e+" in text)  # PyYAML's float pattern needs both
    for version in ((1, 1), (1, 2)):
        yaml = YAML(typ="safe", pure=True)
        yaml.version = version
        assert isinstance(yaml.load(text), float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-inf", -math.inf),
        ("float('-inf')", -math.inf),
        ('float("inf")', math.inf),
        ("-float('inf')", -math.inf),
        ("-np.inf", -math.inf),
        ("torch.inf", math.inf),
        ("-.inf", -math.inf),
        ("-Infinity", -math.inf),
        ("info", None),
        ("-1e9", None),
        (-math.inf, -math.inf),
        (1.0, None),
    ],
)
def test_as_infinite(text, expected):
    assert as_infinite(text) == expected


def test_as_number_and_as_bool():
    assert as_number("1e-3") == 1e-3 and as_number(True) is None and as_number("auto") is None
    assert as_bool("Yes") is True and as_bool("off") is False and as_bool("auto") is None


json_values = st.recursive(
    st.none() | st.booleans() | finite | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=60)
@given(st.dictionaries(st.text(max_size=4), json_values, max_size=4), st.sampled_from([None, 2, "\t"]))
def test_json_spans_locate_every_value(document, indent):
    text = json.dumps(document, indent=indent)
    spans = index_json(text)
    for path, value, _ in walk(document):
        start, end = spans.values[path]
        assert json.loads(text[start:end]) == value


@settings(max_examples=60)
@given(
    st.dictionaries(st.sampled_from(["a", "b", "lr", "c"]), finite, min_size=1), st.sampled_from([None, 4])
)
def test_json_insertion_and_replacement_give_valid_json(document, indent):
    text = json.dumps(document, indent=indent)
    edits = [
        Finding("no_grad_clipping", ("max_grad_norm",), None, "", fix=1.0, exists=False, insert_after="lr"),
        Finding("no_warmup", ("sched", "params", "warmup"), None, "", fix=10, exists=False),
        Finding("lr_high", (next(iter(document)),), None, "", fix=1e-4),
    ]
    fixed = json.loads(fix_json_text(text, edits))
    assert fixed["max_grad_norm"] == 1.0 and fixed["sched"] == {"params": {"warmup": 10}}
    assert fixed[next(iter(document))] == pytest.approx(1e-4)
    if "lr" in document:
        keys = list(fixed)
        assert keys[keys.index("lr") + 1] == "max_grad_norm"
