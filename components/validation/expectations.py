"""The manifest's expectation suites, run with great-expectations 1.x checkpoints.

Tables checked: the manifest (schema, nulls, label and split sets, image facts
recorded at ingestion: geometry, non-finite voxels, intensity range per
modality, mask geometry), its patients (each in exactly one split), its image
contents (no duplicate image across splits), its declared subgroups (each at
least ``min_group_size`` cases), and, against the previous data version, drift
(label prevalence, intensity, sites) with severity ``warning``: drift is
reported, it does not fail the run. Every checkpoint updates a Data Docs site.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from components.data.splits import SPLITS
from components.validation import checks
from components.validation.offline_docs import make_offline

REQUIRED_COLUMNS = ("case_id", "patient_id", "split", "image", "label", "sha256", "nan_count")
NOT_NULL = ("case_id", "patient_id", "split", "image", "label")
MAX_EXAMPLES = 10
INTEGER_TYPES = ["int64", "int32", "int16", "int8", "Int64", "Int32"]
FLOAT_TYPES = ["float64", "float32", "Float64", "Float32", *INTEGER_TYPES]
NUMERIC_COLUMNS = {"label": INTEGER_TYPES, "nan_count": INTEGER_TYPES, "inf_count": INTEGER_TYPES, "age": FLOAT_TYPES,
                   "min": FLOAT_TYPES, "max": FLOAT_TYPES, "mean": FLOAT_TYPES, "std": FLOAT_TYPES}
DEFAULT_INTENSITY_RANGES = {"CT": (-3100.0, 40000.0), "MR": (0.0, None), "PT": (0.0, None)}


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation with example rows."""

    table: str
    expectation: str
    column: str | None
    unexpected_count: int | None
    examples: list
    note: str = ""

    def describe(self) -> str:
        where = f"{self.table}.{self.column}" if self.column else self.table
        count = f" ({self.unexpected_count} rows)" if self.unexpected_count else ""
        shown = f": e.g. {self.examples[:5]}" if self.examples else ""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.expectation} on {where}{count}{shown}{note}"


@dataclass(frozen=True)
class ValidationReport:
    """Result of every suite on one manifest: failures block training, warnings (drift) do not."""

    success: bool
    n_rows: int
    n_expectations: int
    failures: tuple[ExpectationFailure, ...]
    warnings: tuple[ExpectationFailure, ...] = ()
    data_docs: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path


@dataclass(frozen=True)
class _Table:
    name: str
    frame: pd.DataFrame
    expectations: list
    index_columns: list[str]
    notes: dict = field(default_factory=dict)


def _manifest_checks(manifest, e, *, task, num_classes, attributes, consistent_geometry, intensity_ranges) -> list:
    present = set(manifest.columns)
    out = [e.ExpectColumnToExist(column=c) for c in (*REQUIRED_COLUMNS, *attributes)]
    out += [e.ExpectColumnValuesToNotBeNull(column=c) for c in NOT_NULL if c in present]
    out += [e.ExpectColumnValuesToBeInTypeList(column=c, type_list=types) for c, types in NUMERIC_COLUMNS.items()
            if c in present and not (c == "label" and task in ("segmentation", "multilabel", "unlabelled"))]
    if "case_id" in present:
        out.append(e.ExpectColumnValuesToBeUnique(column="case_id"))
    if "label" in present and task == "classification":
        out.append(e.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(num_classes))))
    if "label" in present and task == "segmentation":
        out.append(e.ExpectColumnValuesToMatchRegex(column="label", regex=r"^labels/.+\.nii\.gz$"))
    if "label" in present and task == "unlabelled":  # images for pretraining: no label at all
        out.append(e.ExpectColumnValuesToBeInSet(column="label", value_set=[""]))
    if "label" in present and task == "multilabel":  # a canonical set of classes: "", "1", "0|2"
        classes = "|".join(str(k) for k in range(num_classes))
        out.append(e.ExpectColumnValuesToMatchRegex(column="label", regex=rf"^(({classes})(\|({classes}))*)?$"))
    if "split" in present:
        out.append(e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    for column in ("nan_count", "inf_count"):
        if column in present:
            out.append(e.ExpectColumnValuesToBeBetween(column=column, min_value=0, max_value=0))
    if "ndim" in present:
        out.append(e.ExpectColumnUniqueValueCountToBeBetween(column="ndim", min_value=1, max_value=1))
    if consistent_geometry:
        out += [e.ExpectColumnUniqueValueCountToBeBetween(column=c, min_value=1, max_value=1) for c in ("shape", "spacing") if c in present]
    if {"mask_shape", "shape"} <= present:
        out += [e.ExpectColumnPairValuesToBeEqual(column_A="shape", column_B="mask_shape"),
                e.ExpectColumnPairValuesToBeEqual(column_A="spacing", column_B="mask_spacing")]
    if {"modality", "min", "max"} <= present:
        for modality, (low, high) in sorted(intensity_ranges.items()):
            if not (manifest["modality"] == modality).any():
                continue
            condition = {"row_condition": f'modality=="{modality}"', "condition_parser": "pandas"}
            if low is not None:
                out.append(e.ExpectColumnValuesToBeBetween(column="min", min_value=low, **condition))
            if high is not None:
                out.append(e.ExpectColumnValuesToBeBetween(column="max", max_value=high, **condition))
    return out


def _derive(problems: list, name: str, build) -> _Table | None:
    """A derived table, or a failure saying why the manifest's values could not make it (mixed types, ...)."""
    try:
        return build()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        problems.append(ExpectationFailure(table=name, expectation="derive_table", column=None, unexpected_count=None,
                                           examples=[f"{type(exc).__name__}: {exc}"]))
        return None


def _tables(manifest, *, task, num_classes, attributes, min_group_size, consistent_geometry, intensity_ranges,
            previous, drift_prevalence, drift_intensity_sd) -> tuple[list[_Table], list[ExpectationFailure]]:
    import great_expectations as gx  # noqa: PLC0415 (slow import, only needed here)

    e = gx.expectations
    present = set(manifest.columns)
    problems: list[ExpectationFailure] = []
    frame = manifest.assign(ndim=manifest["shape"].astype(str).str.count("x") + 1) if "shape" in present else manifest
    candidates = [_Table("manifest", frame, _manifest_checks(
        frame, e, task=task, num_classes=num_classes, attributes=attributes,
        consistent_geometry=consistent_geometry, intensity_ranges=intensity_ranges,
    ), ["case_id"] if "case_id" in present else [])]
    if {"patient_id", "split"} <= present:
        candidates.append(_derive(problems, "patients", lambda: _Table(
            "patients", checks.patients_table(manifest),
            [e.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1)], ["patient_id"])))
    if {"sha256", "split", "case_id"} <= present:
        candidates.append(_derive(problems, "duplicates", lambda: _Table(
            "duplicates", checks.duplicates_table(manifest),
            [e.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1)], ["cases"])))
    groups = _derive(problems, "groups", lambda: _Table(
        "groups", checks.groups_table(manifest, attributes),
        [e.ExpectColumnValuesToBeBetween(column="n", min_value=min_group_size)], ["attribute", "group"]))
    if groups is not None and not groups.frame.empty:
        candidates.append(groups)
    if previous is not None:
        candidates += _drift_tables(manifest, previous, e, problems, task=task, drift_prevalence=drift_prevalence,
                                    drift_intensity_sd=drift_intensity_sd)
    return [t for t in candidates if t is not None], problems


def _drift_tables(manifest, previous, e, problems, *, task, drift_prevalence, drift_intensity_sd) -> list[_Table | None]:
    warn = {"severity": "warning"}
    tables = []
    if task == "classification" and "label" in manifest.columns and "label" in previous.columns:
        tables.append(_derive(problems, "drift_labels", lambda: _Table(
            "drift_labels", checks.label_drift_table(manifest, previous),
            [e.ExpectColumnValuesToBeBetween(column="shift", max_value=drift_prevalence, **warn)], ["label"])))
    if {"modality", "mean"} <= set(manifest.columns) & set(previous.columns):
        table = _derive(problems, "drift_intensity", lambda: _Table(
            "drift_intensity", checks.intensity_drift_table(manifest, previous),
            [e.ExpectColumnValuesToBeBetween(column="shift", max_value=drift_intensity_sd, **warn)], ["modality"]))
        if table is not None and not table.frame.empty:
            tables.append(table)
    if "site" in manifest.columns and "site" in previous.columns:
        def sites_table() -> _Table:
            new, gone = checks.site_changes(manifest, previous)
            sites = previous["site"].dropna().astype(str).unique().tolist()
            return _Table("drift_sites", manifest[["site"]].dropna().astype(str),
                          [e.ExpectColumnDistinctValuesToEqualSet(column="site", value_set=sorted(sites), **warn)], [],
                          notes={"site": f"new sites {new}, vanished sites {gone}"})
        tables.append(_derive(problems, "drift_sites", sites_table))
    return tables


def validate_manifest(
    manifest: pd.DataFrame,
    *,
    num_classes: int,
    attributes: Sequence[str] = (),
    min_group_size: int = 1,
    task: str = "classification",
    consistent_geometry: bool = False,
    intensity_ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
    previous: pd.DataFrame | None = None,
    drift_prevalence: float = 0.05,
    drift_intensity_sd: float = 0.5,
    docs_dir: Path | None = None,
) -> ValidationReport:
    """Run the suites on a manifest and collect every failure with example rows.

    Args:
        manifest: the dataset manifest.
        num_classes: labels must lie in ``0..num_classes-1`` (classification).
        attributes: declared demographic columns (must exist, groups large enough).
        min_group_size: smallest allowed group of a declared attribute.
        task: ``classification``, ``multilabel`` (labels are sets of classes, ``0|2``) or ``segmentation``
            (labels are mask paths).
        consistent_geometry: every image must share one shape and one spacing.
        intensity_ranges: plausible (min, max) voxel values per modality, after the modality LUT.
        previous: the previous data version's manifest; drift against it is reported as warnings.
        drift_prevalence: largest allowed change of a class's prevalence (fraction).
        drift_intensity_sd: largest allowed shift of a modality's mean intensity, in previous SDs.
        docs_dir: where to write the great-expectations Data Docs site (HTML); none when None.
    """
    import great_expectations as gx  # noqa: PLC0415 (slow import, only needed here)

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    actions = []
    if docs_dir is not None:
        staging = docs_dir.with_name(docs_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        context.update_data_docs_site("local_site", {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(staging)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")]
    source = context.data_sources.add_pandas("medflow")
    warnings, total = [], 0
    tables, failures = _tables(
        manifest, task=task, num_classes=num_classes, attributes=attributes, min_group_size=min_group_size,
        consistent_geometry=consistent_geometry, intensity_ranges=dict(intensity_ranges or DEFAULT_INTENSITY_RANGES),
        previous=previous, drift_prevalence=drift_prevalence, drift_intensity_sd=drift_intensity_sd,
    )
    for table in tables:
        batch = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=table.name, expectations=table.expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=table.name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=table.name, validation_definitions=[definition], actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": table.index_columns},
        ))
        run = checkpoint.run(batch_parameters={"dataframe": table.frame})
        for result in run.run_results.values():
            total += len(result.results)
            for r in result.results:
                if r.success:
                    continue
                config = r.expectation_config
                examples = r.result.get("unexpected_index_list") or r.result.get("partial_unexpected_list") or []
                if not examples and r.result.get("observed_value") is not None:
                    examples = [{"observed": r.result["observed_value"]}]
                failure = ExpectationFailure(
                    table=table.name, expectation=config.type, column=config.kwargs.get("column"),
                    unexpected_count=r.result.get("unexpected_count"),
                    examples=[_plain(x) for x in examples[:MAX_EXAMPLES]],
                    note=table.notes.get(config.kwargs.get("column"), ""),
                )
                (warnings if str(config.severity.value) == "warning" else failures).append(failure)
    if docs_dir is not None:
        make_offline(staging)
        shutil.rmtree(docs_dir, ignore_errors=True)
        staging.rename(docs_dir)
    return ValidationReport(
        success=not failures, n_rows=len(manifest), n_expectations=total, failures=tuple(failures),
        warnings=tuple(warnings), data_docs=docs_dir / "index.html" if docs_dir is not None else None,
        notes=() if previous is not None else ("no previous data version: drift not checked",),
    )


def _plain(example: object) -> object:
    if isinstance(example, dict):
        return {str(k): _plain(v) for k, v in example.items()}
    if isinstance(example, (list, tuple)):
        return [_plain(v) for v in example]
    return example.item() if hasattr(example, "item") else example
