"""Benchmark: the patient-level bootstrap and the whole evaluation report at 10k and 100k predictions.

Baseline, in the same process: scikit-learn scoring one resample per call
(``roc_auc_score`` etc. with ``sample_weight``), timed on a few resamples and
given per resample. 1,000 resamples, three group attributes, two images per patient.

    .venv/bin/python benchmarks/evaluation.py [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

from report import write_section

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Evaluation: bootstrap and report"
NOTE = ("Before cells, runs, float32 counts and threads (`benchmarks/evaluation.py` at e91c7af, the same day, "
        "the same machine; the distinct-score figure by hand with the same call): 2.11, 7.03 and 37.46 s at "
        "100,000 (overall only, 3 attributes, 3 attributes with distinct scores), 21.70 s for the report. Each "
        "chunk of 32 resamples now costs one dense product of the units' draw counts with their metric terms "
        "per cell of cases that share sex, race and site (24 cells: the overall and each group's sums add cells "
        "up, so a group costs no dense product of its own), and for the overall figures and each group a sparse "
        "product with the indicator of runs of one class along the ascending scores, and a few passes over it "
        "(AUC and sensitivity at specificity). 100,000 distinct scores fall into about 21,700 runs, the rounded "
        "ones into 900: hence the fourth column. Chunks run on both cores (single-threaded BLAS each) while the "
        "next counts are drawn.")


def _data(n: int, decimals: int | None = 3):
    from tests.components.evaluation.references import synthetic_predictions

    y, prob, groups = synthetic_predictions(n, seed=0, decimals=decimals)
    ids = np.array([f"C{i}" for i in range(n)])
    predictions = pd.DataFrame({"case_id": ids, "y_true": y, "prob": prob})
    manifest = pd.DataFrame({"case_id": ids, "patient_id": np.arange(n) // 2, **groups})
    return y, prob, groups, predictions, manifest


def _sklearn_per_resample(y, prob, patients, repeat: int = 5) -> float:
    from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, log_loss, recall_score, roc_auc_score

    codes = np.unique(patients, return_inverse=True)[1]
    rng = np.random.default_rng(0)
    pred = prob >= 0.5
    start = time.perf_counter()
    for _ in range(repeat):
        w = rng.multinomial(codes.max() + 1, np.full(codes.max() + 1, 1 / (codes.max() + 1)))[codes]
        roc_auc_score(y, prob, sample_weight=w)
        accuracy_score(y, pred, sample_weight=w)
        recall_score(y, pred, sample_weight=w)
        recall_score(y, pred, pos_label=0, sample_weight=w)
        f1_score(y, pred, sample_weight=w)
        brier_score_loss(y, prob, sample_weight=w)
        log_loss(y, prob, sample_weight=w)
    return (time.perf_counter() - start) / repeat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    from components.evaluation.intervals import bootstrap_ci
    from components.evaluation.report import evaluate_predictions

    rows = []
    for n in (10_000, 100_000):
        y, prob, groups, predictions, manifest = _data(n)
        patients = manifest["patient_id"].to_numpy()
        start = time.perf_counter()
        bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=args.resamples)
        overall_s = time.perf_counter() - start
        start = time.perf_counter()
        bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=args.resamples, groups=groups)
        grouped_s = time.perf_counter() - start
        distinct_y, distinct_prob, distinct_groups = _data(n, decimals=None)[:3]
        start = time.perf_counter()
        bootstrap_ci(distinct_y, distinct_prob, patients, threshold=0.5, n_resamples=args.resamples,
                     groups=distinct_groups)
        distinct_s = time.perf_counter() - start
        start = time.perf_counter()
        evaluate_predictions(predictions, manifest, n_bootstrap=args.resamples)
        report_s = time.perf_counter() - start
        sk = _sklearn_per_resample(y, prob, patients)
        rows.append((n, overall_s, grouped_s, distinct_s, report_s, sk, sk * args.resamples / overall_s))
    lines = [
        "| predictions | bootstrap, overall only (s) | bootstrap, overall + 3 attributes (s) "
        "| the same, every score distinct (s) | whole report.json (s) | scikit-learn, per resample (ms) "
        "| speed-up over scikit-learn, overall |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {n:,} | {o:.2f} | {g:.2f} | {d:.2f} | {r:.2f} | {sk * 1000:.1f} | {x:.0f}x |"
          for n, o, g, d, r, sk, x in rows],
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        target = "under 1 s for 1,000 resamples of 100,000 predictions with 3 attributes"
        met = "met" if max(rows[-1][2], rows[-1][3]) < 1 else "not met yet"
        section = (
            f"`make bench` (`benchmarks/evaluation.py`) on {date.today().isoformat()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}; {args.resamples} patient-level resamples, two images per patient, "
            f"attributes sex, race, site (2, 4 and 3 groups). Intervals are BCa: besides the resamples, every "
            f"metric is evaluated on at most 100 leave-a-group-of-patients-out rows (the jackknife that gives "
            f"BCa its acceleration), about a tenth more work than percentile intervals (2.96 s in the last "
            f"figures with those).\n\n{table}\n\nTarget ({target}): {met}. {NOTE}\n"
        )
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
