"""Real-world-shaped datasets (issue 16, items 1-5): exactly the expected findings, and notes that say
what was assumed and what was not checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanguard.scan import scan_paths

from .corpus import CASES


def found(result, folder: Path) -> set[tuple[str, str | None, str]]:
    return {(str(Path(f.file).relative_to(folder)), f.field, f.check) for f in result.findings}


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case_has_exactly_the_expected_findings(tmp_path, name):
    case = CASES[name](tmp_path)
    result = scan_paths([tmp_path], **case.options)
    assert found(result, tmp_path) == case.expected
    notes = "\n".join(result.notes)
    for expected in case.notes:
        assert expected in notes
    assert result.exit_code == (1 if case.expected else 0)


def test_gluonts_target_in_other_units_is_named_with_its_ratio(tmp_path):
    """Regression (item 1): `target` was treated as class labels and never checked for scale."""
    CASES["gluonts_x1000"](tmp_path)
    (finding,) = scan_paths([tmp_path]).findings
    assert "x the median of the 4 files with the same fields" in finding.message
    assert "typical |target| is 9.6" in finding.message or "typical |target| is 9.7" in finding.message


def test_ten_x_is_caught_only_among_siblings_of_one_schema(tmp_path):
    """Regression (item 2): a x10 units error was silent at the default --scale-ratio 100."""
    CASES["gluonts_x10"](tmp_path)
    other = tmp_path / "other_schema.jsonl"
    other.write_text('{"target": [1000.0, 2000.0], "extra": 1}\n{"target": [1500.0, 900.0], "extra": 2}\n')
    findings = scan_paths([tmp_path]).findings
    assert {(Path(f.file).name, f.check) for f in findings} == {("part-b.jsonl", "scale_mismatch")}


def test_token_ids_print_as_integers_not_floats(tmp_path):
    """Regression (item 5): the max token id printed as 5.03e+04, hiding that it was 50300."""
    CASES["nanogpt_bin"](tmp_path)
    (finding,) = scan_paths([tmp_path], vocab_size=50257).findings
    assert "max 50300" in finding.message and "e+04" not in finding.message


def test_token_npy_with_65535_is_an_id_problem_not_an_fp16_one(tmp_path):
    """Regression (item 4): only id 65535 was flagged, as an fp16 extreme_scale: the wrong lead."""
    CASES["token_ids_in_npy"](tmp_path)
    result = scan_paths([tmp_path], vocab_size=50257)
    assert [f.check for f in result.findings] == ["token_out_of_range"]
    assert "65535" in result.findings[0].message
    # Without --vocab-size nothing says these are ids: 65535 would overflow if cast to float16.
    assert [f.check for f in scan_paths([tmp_path]).findings] == ["extreme_scale"]


def test_bin_files_without_vocab_size_are_scanned_and_say_so(tmp_path):
    CASES["nanogpt_bin"](tmp_path)
    result = scan_paths([tmp_path])
    assert result.findings == [] and any("not range-checked: pass --vocab-size" in n for n in result.notes)


def test_negative_label_without_num_classes_is_a_finding(tmp_path):
    """Regression (item 5): a label -1 passed as "no problems" without --num-classes."""
    CASES["labels_without_num_classes"](tmp_path)
    result = scan_paths([tmp_path])
    (finding,) = [f for f in result.findings if f.check == "label_out_of_range"]
    assert finding.count == 2 and finding.examples == (3, 40) and "--ignore-index -1" in finding.message
    assert scan_paths([tmp_path], ignore_index=-1).findings == []


def test_one_based_labels_are_named_with_num_classes(tmp_path):
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "labels.npy", np.arange(1, 11).repeat(5))
    (finding,) = scan_paths([tmp_path], num_classes=10).findings
    assert "they look 1-based (subtract 1)" in finding.message


def test_csv_na_cells_are_reported_as_nan_not_empty_rows(tmp_path):
    """Regression (item 3): a CSV cell pandas loads as NaN was reported as "1 empty row"."""
    CASES["nan_as_text"](tmp_path)
    result = scan_paths([tmp_path / "table.csv"])
    by_field = {f.field: f for f in result.findings}
    assert by_field["price"].check == "nonfinite" and "pandas.read_csv loads as NaN" in by_field["price"].message
    assert by_field["price"].examples == (1,) and by_field["qty"].examples == (2,)
    assert by_field["note"].check == "empty"  # a text column's empty cell is just empty


def test_text_nan_in_json_lines_counts_and_a_name_nan_does_not(tmp_path):
    CASES["nan_as_text"](tmp_path)
    result = scan_paths([tmp_path / "export.jsonl"])
    by_field = {f.field: f for f in result.findings}
    assert by_field["x"].count == 2 and by_field["x"].examples == (0, 1)
    assert "written as text" in by_field["x"].message
    assert by_field["y"].examples == (1,)
    assert "name" not in by_field  # the word "Nan" in a text field is a name, not a number


def test_integer_timestamps_do_not_flood_the_output(tmp_path):
    """Regression (item 5): integer timestamp columns gave 10 of 12 findings as extreme_scale."""
    CASES["timestamps_and_ids"](tmp_path)
    result = scan_paths([tmp_path])
    assert result.findings == [] and result.exit_code == 0
