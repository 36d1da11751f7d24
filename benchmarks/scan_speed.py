"""How fast is ``nanguard scan`` on float data, next to ``numpy.isfinite(a).all()`` and a pandas scan?

Run: ``python benchmarks/scan_speed.py [--mb 200]``. Prints times and ratios; asserts nothing.
The design target is a scan within ~1.5x of ``isfinite(...).all()`` on the same bytes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def naive_pandas_scan(a: np.ndarray) -> object:
    """What a hand-written check often looks like: a DataFrame, isna, isinf, describe-style stats."""
    import pandas as pd

    usable = a[: a.size - a.size % 64]  # 64 columns, as a wide table would have; drop the ragged tail
    frame = pd.DataFrame(usable.reshape(-1, 64))
    return (frame.isna().sum(), np.isinf(frame).sum(), frame.abs().max(), frame.std())


def main() -> None:
    from nanguard.scan import scan_dataset, scan_paths

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=200, help="size of the float32 array in MB (default 200)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    a = np.random.default_rng(0).standard_normal(args.mb * 1_000_000 // 4, dtype=np.float32)
    print(f"float32 array: {a.size:,} values, {a.nbytes / 1e6:.0f} MB")

    baseline = best_of(lambda: np.isfinite(a).all(), args.repeat)
    in_memory = best_of(lambda: scan_dataset(a), args.repeat)
    pandas_time = best_of(lambda: naive_pandas_scan(a), max(1, args.repeat // 2))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "data.npy")
        np.save(path, a)
        scan_paths([path])  # warm the page cache so both sides read from memory
        from_file = best_of(lambda: scan_paths([path]), args.repeat)
        file_baseline = best_of(lambda: np.isfinite(np.load(path, mmap_mode="r")).all(), args.repeat)

    rows = [
        ("numpy.isfinite(a).all()", baseline, baseline),
        ("nanguard scan_dataset(a)", in_memory, baseline),
        ("naive pandas scan", pandas_time, baseline),
        ("isfinite on np.load(mmap) .npy", file_baseline, file_baseline),
        ("nanguard scan_paths(.npy)", from_file, file_baseline),
    ]
    for name, seconds, reference in rows:
        print(f"{name:<34} {seconds * 1e3:9.1f} ms   {seconds / reference:5.2f}x")


if __name__ == "__main__":
    main()
