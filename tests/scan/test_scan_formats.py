"""Every file format, with planted problems: the finding's file, field, check and exact rows."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from nanguard.errors import UsageError
from nanguard.scan import scan_paths


def _find(result, check, field="*", file=None):
    found = [
        f
        for f in result.findings
        if f.check == check and (field == "*" or f.field == field) and (file is None or f.file == str(file))
    ]
    assert len(found) == 1, f"expected one {check}/{field} in {result.findings}"
    return found[0]


def _checks(result):
    return sorted((os.path.basename(f.file), f.field, f.check) for f in result.findings)


# --------------------------------------------------------------------------- npy / npz
def test_npy_nonfinite_extreme_and_constant_rows(tmp_path):
    table = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    table[5, 0] = np.nan
    table[17, 2] = -np.inf
    table[9, 1] = 1e6
    table[:, 2][table[:, 2] == table[:, 2]] += 0  # keep column 2 varying
    path = tmp_path / "features.npy"
    np.save(path, table)
    result = scan_paths([path])
    nonfinite = _find(result, "nonfinite", None)
    assert nonfinite.file == str(path)
    assert nonfinite.examples == (5, 17) and nonfinite.count == 2
    assert "1 NaN" in nonfinite.message and "1 -Inf" in nonfinite.message
    assert _find(result, "extreme_scale", None).examples == (9,)
    assert {f.check for f in result.findings} == {"nonfinite", "extreme_scale"}


def test_npy_labels_named_by_file_stem_allow_ignore_index(tmp_path):
    np.save(tmp_path / "labels.npy", np.asarray([0, 3, -100, 10, 2, -1]))
    found = _find(scan_paths([tmp_path], num_classes=10), "label_out_of_range", None)
    assert found.examples == (3, 5) and found.count == 2
    assert "1 such value" in found.message


def test_npy_constant_1d_and_structured_fields(tmp_path):
    np.save(tmp_path / "bias.npy", np.full(8, 1.5, dtype=np.float32))
    records = np.zeros(4, dtype=[("x", "f4"), ("label", "i8")])
    records["x"] = [1.0, np.nan, 2.0, 3.0]
    records["label"] = [0, 1, 7, 1]
    np.save(tmp_path / "records.npy", records)
    result = scan_paths([tmp_path], num_classes=5)
    assert _find(result, "constant", None, tmp_path / "bias.npy").count == 1
    assert _find(result, "nonfinite", "x").examples == (1,)
    assert _find(result, "label_out_of_range", "label").examples == (2,)


def test_corrupt_truncated_and_empty_npy(tmp_path):
    np.save(tmp_path / "good.npy", np.arange(5, dtype=np.float32))
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
    np.save(tmp_path / "whole.npy", np.arange(1000, dtype=np.float64))
    data = (tmp_path / "whole.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[: len(data) // 2])
    os.remove(tmp_path / "whole.npy")
    np.save(tmp_path / "nothing.npy", np.zeros((0, 3)))
    result = scan_paths([tmp_path])
    assert _find(result, "unreadable", None, tmp_path / "garbage.npy").message.startswith("cannot read")
    assert _find(result, "unreadable", None, tmp_path / "truncated.npy")
    assert _find(result, "empty", None, tmp_path / "nothing.npy")
    assert result.files == [
        str(tmp_path / n) for n in ("garbage.npy", "good.npy", "nothing.npy", "truncated.npy")
    ]
    assert not [f for f in result.findings if f.file.endswith("good.npy")]


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_fields_are_array_keys(tmp_path, compressed):
    x = np.ones((30, 2), dtype=np.float32) * np.arange(30)[:, None]
    x[12, 1] = np.inf
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "batch.npz", x=x, y=np.asarray([1, 2, 40, 3] * 5), empty=np.zeros(0))
    result = scan_paths([tmp_path / "batch.npz"], num_classes=10)
    assert _find(result, "nonfinite", "x").examples == (12,)
    assert _find(result, "label_out_of_range", "y").examples == (2, 6, 10, 14, 18)
    assert "'empty'" in _find(result, "empty", None).message


def test_npz_truncated_member_and_object_array(tmp_path):
    np.savez(tmp_path / "whole.npz", x=np.arange(5000, dtype=np.float64))
    member = zipfile.ZipFile(tmp_path / "whole.npz").read("x.npy")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as archive:
        archive.writestr("x.npy", member[: len(member) // 2])
    np.savez(tmp_path / "objects.npz", o=np.asarray([{"a": 1}], dtype=object), ok=np.arange(3.0))
    os.remove(tmp_path / "whole.npz")
    result = scan_paths([tmp_path])
    assert "truncated" in _find(result, "unreadable", "x", tmp_path / "cut.npz").message
    assert "objects" in _find(result, "unreadable", "o", tmp_path / "objects.npz").message


# --------------------------------------------------------------------------- pt
def test_pt_dict_key_paths_lists_and_bfloat16(tmp_path):
    features = torch.randn(6, 4, dtype=torch.bfloat16)
    features[4, 2] = float("nan")
    payload = {
        "x": features,
        "batch": {"labels": torch.tensor([0, 1, 12, 2])},
        "docs": [torch.arange(5), torch.arange(0), torch.tensor([3, 70000]), torch.arange(0)],
        "records": [{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([1, 5000])}],
        "epoch": 3,
    }
    torch.save(payload, tmp_path / "train.pt")
    result = scan_paths([tmp_path / "train.pt"], num_classes=3, vocab_size=1000)
    assert _find(result, "nonfinite", "x").examples == (4,)
    assert _find(result, "label_out_of_range", "batch.labels").examples == (2,)
    assert _find(result, "empty", "docs").examples == (1, 3)
    assert _find(result, "extreme_scale", "docs").examples == (2,)
    assert _find(result, "token_out_of_range", "records.input_ids").examples == (1,)


def test_pt_bare_tensor_and_corrupt_file(tmp_path):
    torch.save(torch.tensor([1.0, float("inf"), 2.0]), tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes(b"PK\x03\x04 broken zip")
    result = scan_paths([tmp_path])
    assert _find(result, "nonfinite", None, tmp_path / "a.pt").examples == (1,)
    assert _find(result, "unreadable", None, tmp_path / "b.pt")


def test_pt_refuses_pickled_code(tmp_path):
    from fractions import Fraction  # any class outside the weights_only allow-list

    torch.save({"x": torch.ones(2), "obj": Fraction(1, 3)}, tmp_path / "unsafe.pt")
    found = _find(scan_paths([tmp_path]), "unreadable", None)
    # Regression (issue 13, item 12): torch's advice to retry with weights_only=False was repeated.
    assert "weights_only=False" not in found.message and "False" not in found.message
    assert "arbitrary Python objects (such as fractions.Fraction)" in found.message
    assert "not loaded" in found.message


# --------------------------------------------------------------------------- csv
def test_csv_rows_start_at_zero_after_the_header(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text(
        "f,label,text,bias\n"
        "1.0,0,hello,1\n"  # row 0
        "nan,1,,1\n"  # row 1: NaN, empty text cell
        ",,,\n"  # row 2: every cell empty
        "\n"  # row 3: blank line
        "3,15,world,1\n"  # row 4: label out of range
        "1e6,-100,x,1\n"  # row 5: extreme, ignore_index
        "2,2,y,1\n"
    )
    result = scan_paths([path], num_classes=10)
    assert _find(result, "nonfinite", "f").examples == (1,)
    assert _find(result, "extreme_scale", "f").examples == (5,)
    assert _find(result, "label_out_of_range", "label").examples == (4,)
    assert _find(result, "empty", "text").examples == (1,)
    blank = _find(result, "empty", None)
    assert blank.examples == (2, 3) and blank.count == 2
    assert _find(result, "constant", "bias").count == 1
    assert len(result.findings) == 6


def test_csv_chunks_keep_row_numbers(tmp_path, monkeypatch):
    from nanguard.scan import formats

    original = formats.read_csv
    monkeypatch.setitem(formats.READERS, ".csv", lambda path, scan: original(path, scan, chunk_rows=7))
    values = [str(i) for i in range(50)]
    values[23] = "inf"
    values[48] = ""
    (tmp_path / "long.csv").write_text("x\n" + "\n".join(values) + "\n")
    result = scan_paths([tmp_path])
    assert _find(result, "nonfinite", "x").examples == (23,)
    assert _find(result, "empty", None).examples == (48,)  # the only column is empty: the whole row is


def test_csv_header_only_and_empty_file(tmp_path):
    (tmp_path / "header.csv").write_text("a,b\n")
    (tmp_path / "nothing.csv").write_text("")
    result = scan_paths([tmp_path])
    assert _checks(result) == [("header.csv", None, "empty"), ("nothing.csv", None, "empty")]


# --------------------------------------------------------------------------- parquet
def test_parquet_row_groups_lists_nulls_and_strings(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "x": pa.array([0.5, None, 2.0, float("nan"), 1.0, 2.0, 3.0, 4.0], type=pa.float32()),
            "input_ids": pa.array([[1, 2], [], [3], [4, 99], None, [5], [6, 7, 8], [123, 1]]),
            "text": ["a", "", "b", "c", "d", "", "e", "f"],
            "meta": [{"score": float(i)} for i in range(7)] + [{"score": float("inf")}],
        }
    )
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=3)
    result = scan_paths([tmp_path], vocab_size=50)
    assert _find(result, "nonfinite", "x").examples == (3,)
    assert _find(result, "empty", "x").examples == (1,)
    assert _find(result, "token_out_of_range", "input_ids").examples == (3, 7)
    empty_ids = _find(result, "empty", "input_ids")
    assert (
        empty_ids.examples == (1, 4)
        and "1 zero-length" in empty_ids.message
        and "1 missing" in empty_ids.message
    )
    assert _find(result, "empty", "text").examples == (1, 5)
    assert _find(result, "nonfinite", "meta.score").examples == (7,)


def test_truncated_parquet_is_unreadable(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": list(range(100))}), tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) - 20])
    result = scan_paths([tmp_path / "cut.parquet", tmp_path / "whole.parquet"])
    assert _checks(result) == [("cut.parquet", None, "unreadable")]


# --------------------------------------------------------------------------- json
def test_jsonl_line_indices_bad_lines_and_sequences(tmp_path):
    lines = [
        {"input_ids": [1, 2, 3], "label": 1, "text": "a"},  # 0
        {"input_ids": [], "label": 12, "text": "b"},  # 1
        "this line is not json",  # 2
        {"input_ids": [5, 500], "label": 2, "text": ""},  # 3
        {"input_ids": [4], "label": None, "score": float("nan"), "text": "c"},  # 4
        {"messages": [{"content": "hi"}, {"content": ""}]},  # 5
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    (tmp_path / "train.jsonl").write_text(text)
    result = scan_paths([tmp_path], num_classes=10, vocab_size=100)
    bad = _find(result, "unreadable", None)
    assert bad.examples == (2,) and bad.count == 1
    assert _find(result, "token_out_of_range", "input_ids").examples == (3,)
    assert _find(result, "empty", "input_ids").examples == (1,)
    assert _find(result, "label_out_of_range", "label").examples == (1,)
    assert _find(result, "empty", "label").examples == (4,)
    assert _find(result, "empty", "text").examples == (3,)
    assert _find(result, "nonfinite", "score").examples == (4,)
    assert _find(result, "empty", "messages.content").examples == (5,)


def test_json_list_columnar_and_json_lines_named_json(tmp_path):
    (tmp_path / "list.json").write_text('[{"x": 1.0}, {"x": Infinity}, {"x": 2.0}]')
    (tmp_path / "columns.json").write_text('{"x": [1.0, 2.0, NaN], "y": [0, 1, 2]}')
    (tmp_path / "lines.json").write_text('{"x": 1.0}\n{"x": NaN}\n')
    (tmp_path / "broken.json").write_text('{"x": [1.0, 2.0')
    result = scan_paths([tmp_path])
    assert _find(result, "nonfinite", "x", tmp_path / "list.json").examples == (1,)
    assert _find(result, "nonfinite", "x", tmp_path / "columns.json").examples == (2,)
    assert _find(result, "nonfinite", "x", tmp_path / "lines.json").examples == (1,)
    assert _find(result, "unreadable", None, tmp_path / "broken.json")


# --------------------------------------------------------------------------- across files
def test_scale_mismatch_flags_the_file_in_other_units(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c", "d"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((200, 3)).astype(np.float32))
    np.save(tmp_path / "e.npy", rng.standard_normal((200, 3)).astype(np.float32) * 1000)
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "f.npy", rng.standard_normal((200, 3)).astype(np.float32) * 1e5)
    result = scan_paths([tmp_path])
    found = _find(result, "scale_mismatch", None)
    assert found.file == str(tmp_path / "e.npy")
    assert found.count == 200
    assert "the median of the 5 files" in found.message


def test_scale_mismatch_compares_csv_columns_across_shards(tmp_path):
    for shard, scale in (("0", 1.0), ("1", 1.0), ("2", 0.001)):
        rows = "\n".join(f"{scale * (i + 1)},{i % 3}" for i in range(20))
        (tmp_path / f"shard{shard}.csv").write_text("length,label\n" + rows + "\n")
    result = scan_paths([tmp_path])
    found = _find(result, "scale_mismatch", "length")
    assert found.file == str(tmp_path / "shard2.csv")


def test_clean_folder_has_no_findings(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.standard_normal((64, 8)).astype(np.float32))
    np.save(tmp_path / "labels.npy", rng.integers(0, 10, 64))
    (tmp_path / "rows.jsonl").write_text(
        "".join(json.dumps({"input_ids": [1, 2, i], "label": i % 3}) + "\n" for i in range(5))
    )
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.npy").write_bytes(b"ignored too")
    result = scan_paths([tmp_path], num_classes=10, vocab_size=10)
    assert result.findings == []
    assert result.exit_code == 0
    assert len(result.files) == 4
    assert result.bytes == sum(os.path.getsize(f) for f in result.files)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"paths": ["/no/such/place"]}, "path not found"),
        ({"paths": []}, "no path"),
        ({"paths": ["notes.txt"]}, "unknown file type"),
        ({"paths": ["."], "num_classes": 0}, "num_classes"),
        ({"paths": ["."], "vocab_size": 2.5}, "vocab_size"),
    ],
)
def test_bad_usage_raises_usage_error(tmp_path, monkeypatch, kwargs, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    np.save(tmp_path / "x.npy", np.ones(2))
    with pytest.raises(UsageError, match=text):
        scan_paths(**kwargs)


def test_folder_without_dataset_files_is_bad_usage(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(UsageError, match="no dataset files"):
        scan_paths([tmp_path])
