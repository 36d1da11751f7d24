"""The cause registry is the one source of cause knowledge, and it agrees with the event schema."""

from __future__ import annotations

import json
from pathlib import Path

from nanguard import causes, events
from nanguard.actions import policy
from nanguard.report.text import CAUSE_WORDS
from tests.conftest import REPO_SCHEMA_COPY, SCHEMA_PATH, load_schema


def _enum(schema: dict, *path: str) -> list[str]:
    node = schema
    for key in path:
        node = node[key]
    return list(node["enum"])


def test_registry_matches_the_schema_enum_in_order() -> None:
    schema = load_schema()
    assert list(causes.CAUSES) == _enum(schema, "properties", "diagnosis", "properties", "cause")
    assert list(events.TRIGGERS) == _enum(schema, "properties", "trigger")
    assert list(events.ACTIONS) == _enum(schema, "properties", "action")
    assert [a.value for a in policy.Action] == list(events.ACTIONS)


def test_the_tests_schema_copy_is_the_shared_spec() -> None:
    if SCHEMA_PATH.exists():
        assert json.loads(Path(SCHEMA_PATH).read_text()) == json.loads(REPO_SCHEMA_COPY.read_text())


def test_every_table_derives_from_the_registry() -> None:
    assert tuple(causes.CAUSES) == events.CAUSES
    assert {name: entry.words for name, entry in causes.CAUSES.items()} == CAUSE_WORDS
    phases = set(events.PHASES)
    for entry in causes.CAUSES.values():
        assert entry.family in causes.FAMILY_ORDER and entry.phase in phases and entry.fixes and entry.words
    assert {"weights_nonfinite", "optimizer_state_nonfinite", "update_overflow"} == causes.STATE_CAUSES
    assert {"weights_nonfinite", "optimizer_state_nonfinite"} == causes.CORRUPTION_CAUSES
    assert {"input_nonfinite", "label_out_of_range", "masked_softmax_all_masked"} <= causes.DATA_CAUSES


def test_fixes_fill_their_fields_and_say_question_mark_for_missing_ones() -> None:
    lines = causes.fixes_for("input_nonfinite", tensor="pixels", rows=[3])
    assert "`pixels`" in lines[0] and "[3]" in lines[0]
    assert "?" in causes.fixes_for("input_nonfinite")[0]
    assert "num_embeddings = 11" in causes.fixes_for("label_out_of_range", "tokens", classes=11, tensor="ids")[0]


def test_one_adam_eps_advice() -> None:
    advice = [line for entry in causes.CAUSES.values() for line in entry.fixes if "eps" in line.lower() and "adam" in line.lower()]
    assert advice and all(f"{causes.ADAM_EPS_FP16:g}" in line for line in advice)
