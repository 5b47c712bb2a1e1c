"""What the evaluation step returns and where it logs (shared by the classification and segmentation runs)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

REPORT_DIR = "evaluation"
# the manifest's columns an evaluation reads, besides the configured attributes: its image facts and hashes (about
# half of a manifest's bytes) stay unread, and out of the per-case tables the report joins
EVALUATED_COLUMNS = ("case_id", "patient_id", "split", "image", "label", "site")


@dataclass(frozen=True)
class ModelEvaluation:
    """Where an evaluation wrote its results."""

    run_id: str
    report: Path
    predictions: Path
    temperature: float

    @property
    def identity(self) -> str:
        """What identifies this evaluation in a step key: its run and the content of its report, so a
        report that changes (a new bootstrap count) re-keys registration and promotion."""
        return f"{self.run_id}:{hashlib.sha256(self.report.read_bytes()).hexdigest()[:16]}"
