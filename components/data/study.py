"""Study designs over a data version: which cases a run trains, tunes and tests on.

External validation (``study.external_sites``): the patients of the named sites are moved out of train, val
and test into an ``external`` split before training, so the model never trains or tunes on them, and the
evaluation reports them apart (``external`` and ``external_delta`` in report.json). The data version itself
is not touched: the study's manifest is derived from it, written under ``.medflow/studies/`` with absolute
image paths (the steps read images relative to their manifest's folder, and an absolute path stays itself),
and named by its content, so the same study of the same version is the same file and the same step key.

Label fractions (``study.train_fraction``, and an arm per entry of ``study.label_fractions``): only a share of the
training patients keeps its labels; the others move to an ``unused`` split that no step reads. The share is
taken per label (at least one patient of each), in an order fixed by a hash of each patient's pseudonym, so
the subsets are nested (10 % holds the 1 %) and the same on every machine; val and test are not touched.

Cross-validation (``study.folds``, an arm per ``study.fold``): the train and val patients are dealt into folds
per label, round-robin in the order of the same kind of hash, so each fold holds its share of every label and a
patient's cases stay together; the arm's fold is its val split, the others its train split, and the test split
is untouched. The folds are fixed for a data version; a version with new patients may deal them anew.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from pathlib import Path

import pandas as pd

from components import paths
from components.config import RunConfig, StudyConfig, Task, with_candidate
from components.data.ingest import load_manifest
from components.errors import ConfigError

EXTERNAL = "external"
UNUSED = "unused"
SITE = "site"


def external_view(manifest: pd.DataFrame, external_sites: tuple[str, ...], *, where: str) -> pd.DataFrame:
    """The manifest with the external sites' cases in the ``external`` split.

    Raises:
        ConfigError: no ``site`` column, a site no case has (with the closest present), or external sites
            that leave no train, val or test case.
    """
    if SITE not in manifest.columns:
        raise ConfigError(f"study.external_sites needs a {SITE!r} column in {where}; its columns are "
                          f"{', '.join(map(str, manifest.columns))}")
    present = sorted(manifest[SITE].dropna().astype(str).unique())
    for site in external_sites:
        if site not in present:
            close = difflib.get_close_matches(site, present, n=1)
            raise ConfigError(f"study.external_sites: no case of {where} is from site {site!r}; sites are "
                              f"{', '.join(present)}" + (f"; did you mean {close[0]!r}?" if close else ""))
    view = manifest.copy()
    external = view[SITE].astype(str).isin(external_sites)
    view.loc[external, "split"] = EXTERNAL
    left = view.loc[~external, "split"].value_counts()
    empty = [split for split in ("train", "val", "test") if not left.get(split, 0)]
    if empty:
        raise ConfigError(f"study.external_sites {list(external_sites)} leave no {' or '.join(empty)} case in {where}: "
                          f"the remaining sites are {', '.join(s for s in present if s not in external_sites) or 'none'}")
    return view


def _strata(manifest: pd.DataFrame, splits: tuple[str, ...], salt: str, *, stratify: bool) -> list[pd.Index]:
    """The patients of ``splits``, per label (a patient's is that of its first case; one stratum when not
    ``stratify``), each stratum in the order of ``sha256(salt:patient_id)``: fixed by the pseudonyms alone."""
    cases = manifest[manifest["split"].isin(splits)].sort_values("case_id")
    patients = cases.groupby("patient_id", sort=False)["label"].first().astype(str)
    if not stratify:
        patients[:] = ""
    order = pd.DataFrame({"stratum": patients.to_numpy(), "rank": [
        hashlib.sha256(f"{salt}:{p}".encode()).hexdigest() for p in patients.index]},
        index=patients.index).sort_values("rank")
    return [group.index for _, group in order.groupby("stratum", sort=True)]


def fraction_view(manifest: pd.DataFrame, fraction: float, *, stratify: bool = True) -> pd.DataFrame:
    """The manifest with all but ``fraction`` of the training patients in the ``unused`` split: per label
    (``stratify``), the first ``ceil(fraction * n)`` patients in hash order (:func:`_strata`), so a smaller
    fraction's patients are always among a larger one's."""
    view = manifest.copy()
    keep = [p for stratum in _strata(view, ("train",), "label-fraction", stratify=stratify)
            for p in stratum[:math.ceil(fraction * len(stratum))]]
    view.loc[(view["split"] == "train") & ~view["patient_id"].isin(keep), "split"] = UNUSED
    return view


def fold_of(manifest: pd.DataFrame, folds: int, *, stratify: bool = True) -> pd.Series:
    """Each train or val patient's fold (0..folds-1), indexed by patient_id: per label, dealt round-robin in
    hash order (:func:`_strata`)."""
    dealt = {p: k % folds for stratum in _strata(manifest, ("train", "val"), "fold", stratify=stratify)
             for k, p in enumerate(stratum)}
    return pd.Series(dealt, name="fold").sort_index()


def fold_view(manifest: pd.DataFrame, folds: int, fold: int, *, outer_fold: int | None = None,
              stratify: bool = True) -> pd.DataFrame:
    """The manifest with fold ``fold`` of the train and val patients as val and the other folds as train; the
    patients of ``outer_fold`` (an inner arm of nested cross-validation) moved to the unused split."""
    view = manifest.copy()
    assigned = view["patient_id"].map(fold_of(manifest, folds, stratify=stratify))
    pooled = view["split"].isin(("train", "val"))
    view.loc[pooled & (assigned == fold), "split"] = "val"
    view.loc[pooled & (assigned != fold), "split"] = "train"
    if outer_fold is not None:
        view.loc[pooled & (assigned == outer_fold), "split"] = UNUSED
    return view


def study_manifest(manifest_path: Path, study: StudyConfig, *, segmentation: bool = False) -> Path:
    """The manifest the run's steps read: ``manifest_path`` itself without a study, else the study's view of it
    (see the module docstring)."""
    if not study.external_sites and study.train_fraction == 1.0 and study.fold is None:
        return manifest_path
    view = load_manifest(manifest_path)
    if study.external_sites:
        view = external_view(view, tuple(study.external_sites), where=str(manifest_path))
    if study.train_fraction < 1.0:
        view = fraction_view(view, study.train_fraction, stratify=not segmentation)
    if study.fold is not None:
        view = fold_view(view, study.folds, study.fold, outer_fold=study.outer_fold, stratify=not segmentation)
    root = manifest_path.parent.resolve()
    for column in ("image", *(("label",) if segmentation else ())):
        view[column] = [str(root / p) for p in view[column]]
    digest = hashlib.sha256(pd.util.hash_pandas_object(view, index=False).to_numpy().tobytes()).hexdigest()[:16]
    out = paths.medflow_home() / "studies" / digest / "manifest.parquet"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_suffix(".tmp")
        view.to_parquet(staged, index=False)
        staged.replace(out)
    return out


def fraction_arms(config: RunConfig) -> list[tuple[float, RunConfig]]:
    """One run config per ``study.label_fractions``, smallest fraction first: the study's own with
    ``study.train_fraction`` set and the fan-out settings cleared, so that each arm's step keys are those of an
    ordinary run on that fraction (the 1.0 arm is the plain run, reused when it has run before)."""
    arms = []
    for fraction in sorted(config.study.label_fractions):
        study = StudyConfig(external_sites=config.study.external_sites, train_fraction=fraction)
        arms.append((fraction, config.model_copy(update={"study": study})))
    return arms


def site_arms(config: RunConfig, manifest_path: Path) -> list[tuple[str | None, RunConfig]]:
    """Leave one site out: the plain run on every site (``None``, the one registered), then one arm per site of
    the manifest holding it out as an external site, in the order of the sites' names.

    Raises:
        ConfigError: no ``site`` column, fewer than two sites, or a site whose absence leaves no train, val or
            test case (checked here, before any arm starts).
    """
    manifest = load_manifest(manifest_path)
    if SITE not in manifest.columns:
        raise ConfigError(f"study.leave_one_site_out needs a {SITE!r} column in {manifest_path}")
    sites = sorted(manifest[SITE].dropna().astype(str).unique())
    if len(sites) < 2:
        raise ConfigError(f"study.leave_one_site_out needs at least two sites; {manifest_path} has "
                          f"{', '.join(sites) or 'none'}")
    arms: list[tuple[str | None, RunConfig]] = [(None, config.model_copy(update={"study": StudyConfig()}))]
    for site in sites:
        external_view(manifest, (site,), where=str(manifest_path))
        arms.append((site, config.model_copy(update={"study": StudyConfig(external_sites=(site,))})))
    return arms


def fold_arms(config: RunConfig, manifest_path: Path) -> list[tuple[int | None, RunConfig]]:
    """k-fold cross-validation: the plain run (``None``, the one registered), then one arm per fold validating
    on it (``study.fold``) and training on the others; external sites stay out of every fold.

    Raises:
        ConfigError: a label with fewer train and val patients than folds (a fold would validate without it).
    """
    sites = config.study.external_sites
    manifest = load_manifest(manifest_path)
    if sites:
        manifest = external_view(manifest, tuple(sites), where=str(manifest_path))
    pool = manifest[manifest["split"].isin(("train", "val"))].sort_values("case_id")
    per_label = pool.groupby("patient_id")["label"].first().astype(str).value_counts()
    if config.data.task is not Task.SEGMENTATION and (per_label < config.study.folds).any():
        label, n = per_label.idxmin(), int(per_label.min())
        raise ConfigError(f"study.folds {config.study.folds} is more than the {n} train and val patient(s) of label "
                          f"{label} in {manifest_path}: every fold must validate on every label; use at most {n} folds")
    arms: list[tuple[int | None, RunConfig]] = [
        (None, config.model_copy(update={"study": StudyConfig(external_sites=sites)}))]
    for fold in range(config.study.folds):
        study = StudyConfig(external_sites=sites, folds=config.study.folds, fold=fold)
        arms.append((fold, config.model_copy(update={"study": study})))
    return arms


def nested_arms(config: RunConfig, manifest_path: Path) -> list[tuple[tuple, RunConfig]]:
    """Nested cross-validation over ``study.candidates``: for each candidate (by its index ``c``), its plain run
    ``("plain", c)``, its arm per fold ``("fold", c, f)`` and, for each fold ``f``, its inner arms ``("inner", c,
    f, j)`` validating on each other fold ``j`` and training on the rest, fold ``f`` unused (so the candidate
    chosen for fold ``f`` never saw it). The folds are :func:`fold_arms`' own.

    Raises:
        ConfigError: a candidate's key or value the config refuses (naming the candidate), or too many folds.
    """
    fold_arms(config, manifest_path)  # refuses more folds than a label's patients
    sites, k = config.study.external_sites, config.study.folds
    arms: list[tuple[tuple, RunConfig]] = []
    for c, overrides in enumerate(config.study.candidates):
        base = with_candidate(config, overrides, where=f"study.candidates[{c}]")
        arm = lambda **study: base.model_copy(update={"study": StudyConfig(external_sites=sites, **study)})  # noqa: E731
        arms.append((("plain", c), arm()))
        arms += [(("fold", c, f), arm(folds=k, fold=f)) for f in range(k)]
        arms += [(("inner", c, f, j), arm(folds=k, fold=j, outer_fold=f)) for f in range(k) for j in range(k) if j != f]
    return arms


def training_patients(manifest_path: Path) -> int:
    """Patients in the train split of a (study) manifest."""
    manifest = pd.read_parquet(manifest_path, columns=["patient_id", "split"])
    return int(manifest.loc[manifest["split"] == "train", "patient_id"].nunique())

