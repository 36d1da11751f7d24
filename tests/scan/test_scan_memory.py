"""``scan_dataset`` on in-memory objects: arrays, tensors, dicts, frames, Datasets and DataLoaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nanguard.errors import UsageError
from nanguard.scan import ScanResult, scan_dataset


def _only(result: ScanResult, check: str):
    found = result.by_check(check)
    assert len(found) == 1, result.findings
    return found[0]


def test_tensor_and_array_fields_are_null():
    tensor = torch.zeros(5, 2)
    tensor[3, 1] = float("nan")
    tensor[:, 0] = torch.arange(5.0)
    result = scan_dataset(tensor, name="features")
    found = _only(result, "nonfinite")
    assert (found.file, found.field, found.examples) == ("features", None, (3,))
    assert result.bytes == 40


def test_tensor_dataset_pair_checks_target_as_labels():
    x = torch.randn(20, 3)
    x[7, 0] = float("inf")
    y = torch.randint(0, 4, (20,))
    y[11] = 9
    result = scan_dataset(TensorDataset(x, y), num_classes=4)
    assert _only(result, "nonfinite").field == "0"
    assert _only(result, "nonfinite").examples == (7,)
    assert _only(result, "label_out_of_range").field == "1"
    assert _only(result, "label_out_of_range").examples == (11,)


def test_dataloader_rows_continue_across_batches():
    x = torch.randn(23, 2)
    x[17, 1] = float("nan")
    y = torch.zeros(23, dtype=torch.long)
    y[5] = -1
    y[22] = 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    result = scan_dataset(loader, num_classes=2)
    assert _only(result, "nonfinite").examples == (17,)
    assert _only(result, "label_out_of_range").examples == (5, 22)


class _Documents(Dataset):
    """Variable-length token sequences, as a tokenised text dataset returns them."""

    def __init__(self) -> None:
        self.docs = [[1, 2, 3], [], [4, 5000], [6]]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> dict:
        ids = torch.tensor(self.docs[index], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "text": "" if index == 3 else "doc"}


def test_map_style_dataset_of_dicts_with_ragged_sequences():
    result = scan_dataset(_Documents(), vocab_size=100)
    assert _only(result, "token_out_of_range").examples == (2,)
    assert _only(result, "label_out_of_range").examples == (2,)
    empties = {(f.field, f.examples) for f in result.by_check("empty")}
    assert empties == {("input_ids", (1,)), ("labels", (1,)), ("text", (3,))}


def test_dict_of_arrays_and_dataframe():
    import pandas as pd

    frame = pd.DataFrame({"a": [1.0, 2.0, np.inf], "label": [0, 5, 1]})
    result = scan_dataset(frame, num_classes=3)
    assert _only(result, "nonfinite").field == "a"
    assert _only(result, "label_out_of_range").examples == (1,)
    arrays = scan_dataset(
        {"x": np.ones((3, 2)) * np.arange(3)[:, None], "targets": np.asarray([0, 1, 2])}, num_classes=2
    )
    assert _only(arrays, "label_out_of_range").field == "targets"


def test_generator_of_items_and_clean_data():
    result = scan_dataset(np.arange(3.0) + i for i in range(5))
    assert result.ok and result.exit_code == 0


def test_unscannable_object_and_bad_options():
    with pytest.raises(UsageError, match="cannot scan"):
        scan_dataset(object())
    with pytest.raises(UsageError, match="num_classes"):
        scan_dataset(np.ones(3), num_classes=-1)
