"""Multi-label cells of a labels CSV and a manifest: a set of classes written ``0|2``.

pandas and scikit-learn have no text form of a label set for a CSV cell; this is it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LABEL_SEPARATOR = "|"


def parse_label_set(value: object, num_classes: int) -> str | None:
    """A multi-label cell (``"2|0"``; empty or missing for none) as its canonical form ``"0|2"``; None when invalid."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
        return ""
    parts = [p.strip() for p in str(value).split(LABEL_SEPARATOR)]
    if not all(p.isdigit() and int(p) < num_classes for p in parts):
        return None
    return LABEL_SEPARATOR.join(str(k) for k in sorted({int(p) for p in parts}))


def label_matrix(labels: pd.Series, num_classes: int) -> np.ndarray:
    """(N, L) 0/1 of canonical multi-label cells."""
    out = np.zeros((len(labels), num_classes), dtype=np.int64)
    for i, cell in enumerate(labels):
        for k in str(cell).split(LABEL_SEPARATOR) if cell else ():
            out[i, int(k)] = 1
    return out
