"""The manifest's expectation suites, run with great-expectations 1.x.

Three tables are checked: the manifest itself (schema, nulls, label and split
sets, image facts), its patients (each in exactly one split: no leakage) and
its declared subgroups (each at least ``min_group_size`` cases).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from components.data.splits import SPLITS

REQUIRED_COLUMNS = ("case_id", "patient_id", "split", "image", "label", "sha256", "nan_count")
NOT_NULL = ("case_id", "patient_id", "split", "image", "label")
MAX_EXAMPLES = 10


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation with example rows."""

    table: str
    expectation: str
    column: str | None
    unexpected_count: int | None
    examples: list

    def describe(self) -> str:
        where = f"{self.table}.{self.column}" if self.column else self.table
        count = f" ({self.unexpected_count} rows)" if self.unexpected_count else ""
        shown = f": e.g. {self.examples[:5]}" if self.examples else ""
        return f"{self.expectation} on {where}{count}{shown}"


@dataclass(frozen=True)
class ValidationReport:
    """Result of every suite on one manifest."""

    success: bool
    n_rows: int
    n_expectations: int
    failures: tuple[ExpectationFailure, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path


def _suites(
    manifest: pd.DataFrame, *, num_classes: int, attributes: Sequence[str], min_group_size: int
) -> list[tuple[str, pd.DataFrame, list, list[str]]]:
    """(table name, frame, expectations, index columns for examples) for each table."""
    import great_expectations as gx  # noqa: PLC0415 (slow import, only needed here)

    e = gx.expectations
    manifest_checks = [e.ExpectColumnToExist(column=c) for c in (*REQUIRED_COLUMNS, *attributes)]
    present = set(manifest.columns)
    manifest_checks += [e.ExpectColumnValuesToNotBeNull(column=c) for c in NOT_NULL if c in present]
    if "case_id" in present:
        manifest_checks.append(e.ExpectColumnValuesToBeUnique(column="case_id"))
    if "label" in present:
        manifest_checks.append(e.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(num_classes))))
    if "split" in present:
        manifest_checks.append(e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    if "nan_count" in present:
        manifest_checks.append(e.ExpectColumnValuesToBeBetween(column="nan_count", min_value=0, max_value=0))
    tables = [("manifest", manifest, manifest_checks, ["case_id"] if "case_id" in present else [])]
    if {"patient_id", "split"} <= present:
        patients = manifest.groupby("patient_id", as_index=False)["split"].nunique().rename(columns={"split": "n_splits"})
        tables.append(("patients", patients, [e.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1)], ["patient_id"]))
    groups = pd.DataFrame(
        [
            {"attribute": a, "group": str(g), "n": int(n)}
            for a in attributes if a in present
            for g, n in manifest[a].fillna("unknown").value_counts().items()
        ],
        columns=["attribute", "group", "n"],
    )
    if not groups.empty:
        tables.append(("groups", groups, [e.ExpectColumnValuesToBeBetween(column="n", min_value=min_group_size)], ["attribute", "group"]))
    return tables


def validate_manifest(
    manifest: pd.DataFrame, *, num_classes: int, attributes: Sequence[str] = (), min_group_size: int = 1
) -> ValidationReport:
    """Run the suites on a manifest and collect every failure with example rows.

    Args:
        manifest: the dataset manifest.
        num_classes: labels must lie in ``0..num_classes-1``.
        attributes: declared demographic columns (must exist, groups large enough).
        min_group_size: smallest allowed group of a declared attribute.
    """
    import great_expectations as gx  # noqa: PLC0415 (slow import, only needed here)

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("medflow")
    failures, total = [], 0
    for name, frame, expectations, index_columns in _suites(
        manifest, num_classes=num_classes, attributes=attributes, min_group_size=min_group_size
    ):
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame}
        )
        suite = gx.ExpectationSuite(name=name, expectations=expectations)
        fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": index_columns}
        result = batch.validate(suite, result_format=fmt)
        total += len(result.results)
        for r in result.results:
            if r.success:
                continue
            examples = r.result.get("unexpected_index_list") or r.result.get("partial_unexpected_list") or []
            failures.append(
                ExpectationFailure(
                    table=name,
                    expectation=r.expectation_config.type,
                    column=r.expectation_config.kwargs.get("column"),
                    unexpected_count=r.result.get("unexpected_count"),
                    examples=[_plain(x) for x in examples[:MAX_EXAMPLES]],
                )
            )
    return ValidationReport(success=not failures, n_rows=len(manifest), n_expectations=total, failures=tuple(failures))


def _plain(example: object) -> object:
    if isinstance(example, dict):
        return {str(k): _plain(v) for k, v in example.items()}
    return example.item() if hasattr(example, "item") else example
