"""Does a batch of new studies look like the data the model was trained on?

Three kinds of evidence, each against the model's own lineage:

- **input facts** (the facts ingestion records for every case: intensity mean and spread; modality, shape
  and spacing), against the training split of the model's data version, when the workspace holds it;
- **predictions**: a classifier's confidence (and, for a binary model, its positive-class probability)
  against the model's own test-set predictions, logged by its evaluation; a segmentation's predicted
  foreground fraction against the training masks' foreground.

A numeric fact is compared with scipy's two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``: exact
for small samples, no binning, one distribution-free p-value per fact, which is what a per-batch check of a
few scalar facts needs; alibi-detect and evidently add a framework for the same test). The batch drifts on a
fact when its p-value is under ``alpha`` divided by the number of facts tested (Bonferroni, so that checking
more facts does not raise more false alarms). A categorical fact drifts when the batch holds values the
training data never had (a new modality, shape or spacing).

**Embedding drift** (classifiers): the batch's penultimate features (what the model computes before its head;
up to 1,000 inputs drawn from a larger batch) against those of up to 500 training cases, by the maximum mean discrepancy with a Gaussian kernel (bandwidth:
the median pairwise distance) and a permutation p-value from ``scipy.stats.permutation_test``. This catches a
shift the scalar facts miss (new anatomy, another vendor's texture at the same brightness). The kernel
statistic is written here over a precomputed kernel matrix, all permutations at once as matrix products: scipy has
no MMD, and alibi-detect's MMD detector brings TensorFlow or a pinned torch backend, a heavy dependency for one
statistic that scikit-learn's ``rbf_kernel`` checks in the tests.
"""

from __future__ import annotations

import tempfile

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from scipy import stats
from scipy.spatial.distance import cdist

from components import paths
from components.data.versioning import read_version
from components.inference.results import REPORT_DIR

NUMERIC_FACTS = ("mean", "std")
EMBEDDING_REFERENCE = 500  # training cases whose features the batch is compared with
EMBEDDING_BATCH = 1000  # predicted inputs drawn for the test from a larger batch (the kernel is quadratic)
N_PERMUTATIONS = 500
CATEGORICAL_FACTS = ("modality", "shape", "spacing")
UNKNOWN_MODALITY = "OT"  # what ingestion records for NIfTI and PNG input, which carry no modality: never new


def data_manifest(dataset: str, data_version: str) -> pd.DataFrame | None:
    """The manifest of ``dataset`` at ``data_version``, when this workspace holds that version."""
    dvc_file, manifest = paths.data_root() / f"{dataset}.dvc", paths.data_root() / dataset / "manifest.parquet"
    if not (dataset and dvc_file.is_file() and manifest.is_file() and read_version(dvc_file) == data_version):
        return None
    return pd.read_parquet(manifest)


def training_facts(dataset: str, data_version: str) -> pd.DataFrame | None:
    """The training split's manifest of ``dataset`` at ``data_version``, when this workspace holds that version."""
    frame = data_manifest(dataset, data_version)
    if frame is None:
        return None
    return frame[frame["split"] == "train"] if "split" in frame.columns else frame


def reference_predictions(run_id: str) -> pd.DataFrame | None:
    """The model's test-set predictions, as its evaluation logged them (None when the run has none)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return pd.read_parquet(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{REPORT_DIR}/predictions.parquet", dst_path=tmp))
        except (MlflowException, OSError):
            return None


def _prediction_scores(table: pd.DataFrame, task: str) -> dict[str, np.ndarray]:
    """The numbers a classifier's prediction table says about its batch: confidence, and a binary model's
    positive-class probability."""
    columns = [c for c in table.columns if str(c) == "prob" or str(c).startswith("prob_")]
    prob = table[columns].to_numpy(float)
    if columns == ["prob"]:  # an evaluation table of a binary model: the positive class only
        prob = np.column_stack([1 - prob[:, 0], prob[:, 0]])
    scores = {"confidence": (np.maximum(prob, 1 - prob) if task == "multilabel" else prob).max(axis=1)}
    if prob.shape[1] == 2 and task != "multilabel":
        scores["probability"] = prob[:, 1]
    return scores


def mmd_test(batch: np.ndarray, reference: np.ndarray, *, n_resamples: int = N_PERMUTATIONS, seed: int = 0) -> dict:
    """Unbiased squared MMD between two samples of features (rows), with its permutation p-value."""
    pooled = np.vstack([batch, reference]).astype(np.float64)
    distances = cdist(pooled, pooled, "sqeuclidean")
    off_diagonal = distances[np.triu_indices(len(pooled), 1)]
    bandwidth = float(np.median(off_diagonal)) if len(off_diagonal) and np.median(off_diagonal) > 0 else 1.0
    kernel = np.exp(-distances / bandwidth)
    n, m = len(pooled), len(batch)
    diagonal = np.diag(kernel)

    def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        # one row per permutation: the batch's members as an indicator, the three kernel block sums from it
        members = np.zeros((*x.shape[:-1], n))
        np.put_along_axis(members, x.astype(int), 1.0, axis=-1)
        others = 1.0 - members
        weighted = members @ kernel
        within_x = (weighted * members).sum(-1) - members @ diagonal
        within_y = (others @ kernel * others).sum(-1) - others @ diagonal
        between = (weighted * others).sum(-1)
        return within_x / (m * (m - 1)) + within_y / ((n - m) * (n - m - 1)) - 2 * between / (m * (n - m))

    test = stats.permutation_test((np.arange(m), np.arange(m, n)), statistic, permutation_type="independent",
                                  vectorized=True, n_resamples=n_resamples, alternative="greater", random_state=seed,
                                  batch=100)
    return {"fact": "embedding.features", "test": "mmd_permutation", "statistic": float(test.statistic),
            "p_value": float(test.pvalue), "bandwidth": bandwidth, "n_batch": len(batch), "n_reference": len(reference)}


def embedding_drift(python_model, model, features: np.ndarray | None, num_classes: int,
                    samples: dict | None = None) -> dict | str:
    """The MMD test of the batch's penultimate features (N, D), taken from the pass that predicted them
    (:func:`components.training.backbones.captured_features`), against the training split's, or why there is
    none; the two feature matrices go into ``samples`` (for the page's plot) when given."""
    from components.training.backbones import penultimate  # noqa: PLC0415 (torch, for classifiers only)
    from components.training.forward import extract_features  # noqa: PLC0415

    if model.task == "segmentation":
        return "embedding drift not computed: it compares a classifier's features"
    reference = training_facts(model.dataset, model.data_version)
    if reference is None or len(reference) < 2 or features is None or len(features) < 2:
        return "embedding drift not computed: it needs the training data and at least two predicted inputs"
    # the training cases' features are the same for every batch of this version: kept in the workspace
    cache = paths.medflow_home() / "cache" / "drift" / f"{model.run_id}-{model.data_version}-{EMBEDDING_REFERENCE}.npy"
    if cache.is_file():
        seen = np.load(cache)
    else:
        sample = reference.sample(min(len(reference), EMBEDDING_REFERENCE), random_state=0)
        seen = extract_features(penultimate(python_model.model, num_classes), python_model.spec, sample,
                                paths.data_root() / model.dataset, python_model.device,
                                description="Features of training cases")
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".tmp.npy"), seen)
        cache.with_suffix(".tmp.npy").replace(cache)
    features, seen = features.reshape(len(features), -1), seen.reshape(len(seen), -1)
    if samples is not None:
        samples["embedding.features"] = (features, seen)
    return mmd_test(features, seen)


def ks_test(name: str, batch: np.ndarray, reference: np.ndarray) -> dict:
    """scipy's two-sample Kolmogorov-Smirnov test of one fact (finite values only)."""
    batch, reference = batch[np.isfinite(batch)], reference[np.isfinite(reference)]
    test = stats.ks_2samp(batch, reference)
    return {"fact": name, "test": "ks_2samp", "statistic": float(test.statistic), "p_value": float(test.pvalue),
            "n_batch": int(len(batch)), "n_reference": int(len(reference))}


def batch_drift(model, *, facts: pd.DataFrame, predictions: pd.DataFrame, alpha: float = 0.01,
                embedding: dict | str | None = None, samples: dict | None = None) -> dict:
    """The batch's drift report (``drift.json``): every test, which drifted, and flat metrics for MLflow.
    ``embedding`` is :func:`embedding_drift`'s test, or its reason for none; each numeric fact's batch and
    reference values go into ``samples`` when given (for the page's plots)."""
    tests, notes = [], []
    samples = {} if samples is None else samples

    def _ks(name: str, batch: np.ndarray, reference: np.ndarray) -> dict:
        batch, reference = batch[np.isfinite(batch)], reference[np.isfinite(reference)]
        samples[name] = (batch, reference)
        return ks_test(name, batch, reference)

    reference = training_facts(model.dataset, model.data_version)
    if reference is None:
        notes.append(f"input facts not compared: this workspace does not hold {model.dataset}@{model.data_version[:12]}, "
                     "the model's training data (run medflow predict in its workspace, or medflow data checkout)")
    else:
        tests += [_ks(f"input.{f}", facts[f].to_numpy(float), reference[f].to_numpy(float))
                  for f in NUMERIC_FACTS if f in facts and f in reference]
        for fact in CATEGORICAL_FACTS:
            if fact in facts and fact in reference:
                known = set(reference[fact].astype(str)) | ({UNKNOWN_MODALITY} if fact == "modality" else set())
                unseen = facts[fact].astype(str)[~facts[fact].astype(str).isin(known)]
                tests.append({"fact": f"input.{fact}", "test": "unseen values", "unseen_share": float(len(unseen) / len(facts)),
                              "unseen": sorted(set(unseen))[:10]})
    if model.task == "segmentation":  # the predicted foreground against the training masks' foreground
        if reference is not None and "foreground" in reference:
            tests.append(_ks("prediction.foreground", predictions["foreground"].to_numpy(float),
                             reference["foreground"].to_numpy(float)))
    elif (earlier := reference_predictions(model.run_id)) is None:
        notes.append(f"predictions not compared: run {model.run_id} logged no test predictions")
    else:
        seen, now = _prediction_scores(earlier, model.task), _prediction_scores(predictions, model.task)
        tests += [_ks(f"prediction.{name}", now[name], seen[name]) for name in now if name in seen]
    if isinstance(embedding, dict):  # last: inputs, then predictions, then the features
        tests.append(embedding)
    elif embedding:
        notes.append(embedding)
    numeric = [t for t in tests if "p_value" in t]
    corrected = alpha / max(len(numeric), 1)
    for t in tests:
        t["drifted"] = t["p_value"] < corrected if "p_value" in t else t["unseen_share"] > 0
    drifted = [t["fact"] for t in tests if t["drifted"]]
    metrics = {f"drift_{t['fact'].replace('.', '_')}_{key}": t[key] for t in tests
               for key in ("statistic", "p_value", "unseen_share") if key in t}
    return {"model": model.name, "version": model.version, "data_version": model.data_version, "alpha": alpha,
            "alpha_per_test": corrected, "n_batch": len(predictions), "tests": tests, "drifted": drifted,
            "detected": bool(drifted), "notes": notes, "metrics": {**metrics, "drift_detected": float(bool(drifted))}}

