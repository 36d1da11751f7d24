"""The numeric core: planted problems are found at exactly their rows, across chunk boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanguard.scan import scan_dataset
from nanguard.scan.core import Sampler, field_role, role_of_name, typical_magnitude
from nanguard.scan.core import ScanOptions as Options

SMALL_CHUNKS = [1 << 20, 64, 24]  # the default, and a few rows per chunk to cross chunk boundaries


def _only(result, check):
    found = result.by_check(check)
    assert len(found) == 1, result.findings
    return found[0]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 300),
    cols=st.sampled_from([0, 1, 3]),
    data=st.data(),
    chunk=st.sampled_from(SMALL_CHUNKS),
)
def test_planted_nonfinite_values_are_all_found_and_only_those(rows, cols, data, chunk):
    shape = (rows,) if cols == 0 else (rows, cols)
    size = int(np.prod(shape))
    positions = data.draw(st.sets(st.integers(0, size - 1), max_size=min(size, 25)))
    planted = data.draw(
        st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=len(positions), max_size=len(positions))
    )
    values = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    for position, bad in zip(sorted(positions), planted, strict=True):
        values[position] = bad
    array = values.reshape(shape)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nanguard.scan.feed.CHUNK_BYTES", chunk)
        result = scan_dataset(array)
    bad_rows = sorted({p // max(cols, 1) for p in positions})
    found = result.by_check("nonfinite")
    if not positions:
        assert found == []
        return
    assert len(found) == 1
    assert found[0].count == len(positions)
    assert list(found[0].examples) == bad_rows[:10]
    assert found[0].field is None
    assert f"in {len(bad_rows)} row" in found[0].message


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-200, 30), min_size=1, max_size=200),
    num_classes=st.integers(1, 20),
    chunk=st.sampled_from(SMALL_CHUNKS),
)
def test_labels_outside_range_are_found_except_ignore_index(labels, num_classes, chunk):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nanguard.scan.feed.CHUNK_BYTES", chunk)
        result = scan_dataset({"labels": np.asarray(labels)}, num_classes=num_classes)
    expected = [i for i, v in enumerate(labels) if (v < 0 or v >= num_classes) and v != -100]
    found = result.by_check("label_out_of_range")
    if not expected:
        assert found == []
        return
    assert len(found) == 1
    assert found[0].field == "labels"
    assert found[0].count == len(expected)
    assert list(found[0].examples) == expected[:10]
    assert "ignore_index" in found[0].message


@settings(max_examples=40, deadline=None)
@given(data=st.data(), chunk=st.sampled_from(SMALL_CHUNKS))
def test_extreme_values_are_finite_values_beyond_float16(data, chunk):
    values = np.asarray(
        data.draw(
            st.lists(
                st.sampled_from([0.5, -3.0, 65504.0, 65505.0, -1e6, 1e30, np.inf]), min_size=1, max_size=150
            )
        )
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nanguard.scan.feed.CHUNK_BYTES", chunk)
        result = scan_dataset({"x": values})
    expected = [i for i, v in enumerate(values) if np.isfinite(v) and abs(v) > 65504]
    found = result.by_check("extreme_scale")
    assert [list(f.examples) for f in found] == ([expected[:10]] if expected else [])


@pytest.mark.parametrize("chunk", SMALL_CHUNKS)
def test_constant_columns_of_a_table_are_named(chunk, monkeypatch):
    monkeypatch.setattr("nanguard.scan.feed.CHUNK_BYTES", chunk)
    table = np.random.default_rng(0).standard_normal((50, 6))
    table[:, 1] = 7.0
    table[:, 4] = 0.0
    table[49, 4] = 0.5  # differs only in the last row: not constant
    table[10, 2] = np.nan  # a NaN column is reported as nonfinite, not as constant
    found = _only(scan_dataset(table), "constant")
    assert found.count == 1
    assert "columns 1," in found.message and "1 of 6 columns" in found.message


def test_constant_needs_more_than_one_row_and_skips_token_ids():
    assert scan_dataset(np.asarray([3.0])).by_check("constant") == []
    assert _only(scan_dataset(np.full(5, 2.5)), "constant").count == 1
    assert scan_dataset({"input_ids": np.ones((4, 3), dtype=np.int64)}).by_check("constant") == []


def test_float_targets_that_are_not_whole_numbers_are_not_checked_as_labels():
    result = scan_dataset({"y": np.asarray([0.5, 12.25, 3.0])}, num_classes=3)
    assert result.by_check("label_out_of_range") == []
    whole = scan_dataset({"y": np.asarray([0.0, 12.0, 3.0])}, num_classes=3)
    assert list(_only(whole, "label_out_of_range").examples) == [1, 2]


def test_labels_fall_back_to_vocab_size_for_language_model_targets():
    result = scan_dataset({"labels": np.asarray([[1, 2, -100], [5, 99, 3]])}, vocab_size=50)
    found = _only(result, "label_out_of_range")
    assert found.examples == (1,) and found.count == 1
    assert "--vocab-size" in found.message


def test_token_ids_checked_against_vocab_size_and_minus_100_is_not_allowed():
    result = scan_dataset({"input_ids": np.asarray([[1, 2], [-100, 3], [4, 10]])}, vocab_size=10)
    found = _only(result, "token_out_of_range")
    assert found.examples == (1, 2) and found.count == 2


def test_label_and_token_fields_are_not_flagged_as_float16_overflow():
    ids = np.asarray([70000, 120000, 5])
    assert scan_dataset({"input_ids": ids}, vocab_size=128256).findings == []


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("labels", "label"),
        ("y_train", "label"),
        ("trainTargets", "label"),
        ("class", "label"),
        ("input_ids", "token"),
        ("decoder_input_ids", "token"),
        ("tokens", "token"),
        ("ids", "token"),
        ("user_id", "data"),
        ("position_ids", "data"),
        ("attention_mask", "mask"),
        ("features", "data"),
    ],
)
def test_role_of_name(name, role):
    assert role_of_name(name) == role


def test_field_role_prefers_explicit_label_field_then_field_then_file_stem():
    options = Options(label_fields=frozenset({"answer"}))
    assert field_role("answer", "train", options) == "label"
    assert field_role("batch.answer", "train", options) == "label"
    assert field_role("batch.labels", "tokens", options) == "label"
    assert field_role(None, "train_labels", options) == "label"
    assert field_role("arr_0", "input_ids", options) == "token"
    assert field_role("x", "labels", options) == "data"


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=20), capacity=st.sampled_from([8, 64, 1024]))
def test_sampler_stays_bounded_and_evenly_spaced(sizes, capacity):
    sampler = Sampler(capacity)
    start = 0
    for size in sizes:
        sampler.add(np.arange(start, start + size, dtype=np.float64))
        start += size
    sample = sampler.values()
    assert sample.size <= capacity
    expected = np.arange(0, start, sampler.stride, dtype=np.float64)
    np.testing.assert_array_equal(sample, expected)


def test_typical_magnitude_is_robust_to_zeros_outliers_and_nan():
    sample = np.asarray([0.0, 0.0, 0.0, 2.0, -2.0, 2.0, 1e9, np.nan])
    assert typical_magnitude(sample) == 2.0
    assert typical_magnitude(np.zeros(4)) is None


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.one_of(
            st.lists(st.sampled_from([0.0, 1.5, -2.0, 7.0, float("nan"), float("inf")]), max_size=6),
            st.sampled_from([1.0, 2.0, float("nan"), None]),
        ),
        min_size=1,
        max_size=60,
    ),
    flush_rows=st.sampled_from([1, 3, 4096]),
)
def test_row_by_row_values_keep_exact_row_indices(rows, flush_rows):
    """JSON-lines-like rows: scalars, ragged lists, empty lists and nulls, flushed in any grouping."""
    from nanguard.scan.feed import FileScan, RowBuffer

    scan = FileScan("rows.jsonl", None, Options())
    buffer = RowBuffer(scan.field("x"), flush_rows=flush_rows)
    for index, value in enumerate(rows):
        buffer.add(index, value)
    buffer.flush()
    findings = {f.check: f for f in scan.findings()}

    def values(row):
        return row if isinstance(row, list) else [row]

    nonfinite = [i for i, r in enumerate(rows) if r is not None and not np.isfinite(values(r)).all()]
    empty = [i for i, r in enumerate(rows) if r is None or r == []]
    assert list(findings["nonfinite"].examples if nonfinite else []) == nonfinite[:10]
    assert ("nonfinite" in findings) == bool(nonfinite)
    assert list(findings["empty"].examples if empty else []) == empty[:10]
    assert ("empty" in findings) == bool(empty)


def test_rows_mixing_scalars_and_lists_do_not_crash_the_constant_check():
    """Regression: rows [[0, 0], 1.0, [0.0]] flushed one by one raised IndexError in the constant check."""
    from nanguard.scan.feed import FileScan, RowBuffer

    scan = FileScan("rows.jsonl", None, Options())
    buffer = RowBuffer(scan.field("x"), flush_rows=1)
    for index, value in enumerate([[0.0, 0.0], 1.0, [0.0]]):
        buffer.add(index, value)
    buffer.flush()
    assert [f.check for f in scan.findings()] == []
