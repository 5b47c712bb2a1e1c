"""A full-width CT series written with pydicom, for the memory bounds of reading and converting it."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

LARGE_SLICES = 48


@pytest.fixture
def large_ct_series(tmp_path) -> tuple:
    """(folder, volume): 48 slices of 512x512 int16 in files named out of position order, and the expected
    float32 volume (rows, cols, slices) after the rescale, sorted by position (independent of medflow)."""
    rng = np.random.default_rng(0)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    slices = {}
    for n, k in enumerate(rng.permutation(LARGE_SLICES)):
        ds = template.copy()
        ds.Rows = ds.Columns = 512
        pixels = rng.integers(-1000, 2000, size=(512, 512), dtype=np.int16)
        ds.PixelData, ds.ImagePositionPatient = pixels.tobytes(), [0.0, 0.0, float(k)]
        ds.save_as(folder / f"file{n:03d}.dcm", enforce_file_format=True)
        slices[k] = (pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32)
    return folder, np.stack([slices[k] for k in range(LARGE_SLICES)], axis=-1)


def traced_peak(function: Callable, *args) -> tuple:
    """``function(*args)`` and the peak of Python's and numpy's allocations while it ran (bytes)."""
    tracemalloc.start()
    try:
        result = function(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
