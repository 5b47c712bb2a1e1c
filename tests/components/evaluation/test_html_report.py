from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from components.evaluation.html_report import render_html, write_html_report
from components.evaluation.report import evaluate_predictions

from .references import prediction_tables


def _tables(n=400, k=2):
    return prediction_tables(n, k=k, seed=2)


def test_page_has_every_table_and_figure_inline():
    predictions, manifest = _tables()
    report = evaluate_predictions(predictions, manifest, n_bootstrap=100).to_dict()
    page = render_html(report, predictions, manifest, title="T")
    assert page.count("<table>") == 1 + 1 + 3  # overall, gaps, one per attribute
    # the gap chart, then ROC + reliability for each of the three attributes, all inline
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 1 + 2 * 3
    assert "src='http" not in page and "<script" not in page
    for groups in report["groups"].values():
        for group in groups:
            assert f"<td>{group}</td>" in page


def test_multiclass_page_has_reliability_but_no_roc():
    predictions, manifest = _tables(k=3)
    report = evaluate_predictions(predictions, manifest, n_bootstrap=0).to_dict()
    page = render_html(report, predictions, manifest)
    assert "ROC" not in page and len(re.findall(r"base64,", page)) == 1 + 3


def test_group_names_are_escaped_and_one_class_groups_say_why():
    predictions, manifest = _tables(n=60)
    manifest["site"] = ["<b>x</b>"] * 30 + ["y"] * 30
    predictions.loc[30:, "y_true"] = 0
    report = evaluate_predictions(predictions, manifest, attributes=["site"], n_bootstrap=0, min_group_size=5).to_dict()
    page = render_html(report, predictions, manifest)
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "only one class (0) present" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make test installs it as root)")
def test_headless_chromium_renders_the_page(tmp_path):
    from PIL import Image

    predictions, manifest = _tables()
    report = evaluate_predictions(predictions, manifest, n_bootstrap=100).to_dict()
    page = write_html_report(report, predictions, manifest, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2400, 1200)
    dark = (image.sum(axis=2) < 300).mean()  # text, lines and markers
    colour = (np.ptp(image, axis=2) > 60).mean()  # the coloured curves of the figures
    assert dark > 0.005 and colour > 0.001


@pytest.mark.parametrize("n", [1000, 150, 40])
def test_reliability_points_are_scikit_learns_curve_with_each_bins_count(n):
    from sklearn.calibration import calibration_curve  # noqa: PLC0415

    from components.evaluation.html_report import MIN_PER_BIN, reliability_points  # noqa: PLC0415

    rng = np.random.default_rng(n)
    confidence = rng.beta(2, 5, n)
    hit = (rng.random(n) < confidence).astype(int)
    predicted, observed, counts, strategy = reliability_points(hit, confidence)
    n_bins = 15 if n >= 15 * MIN_PER_BIN else n // MIN_PER_BIN  # a small group: fewer bins, of equal counts
    assert strategy == ("uniform" if n >= 15 * MIN_PER_BIN else "quantile")
    expected_observed, expected_predicted = calibration_curve(hit, confidence, n_bins=n_bins, strategy=strategy)
    np.testing.assert_allclose(predicted, expected_predicted)
    np.testing.assert_allclose(observed, expected_observed)
    edges = np.linspace(0, 1, n_bins + 1) if strategy == "uniform" else np.percentile(confidence, np.linspace(0, 100, n_bins + 1))
    expected_counts = np.histogram(confidence, bins=edges)[0]  # numpy's own binning, for the cases behind each point
    np.testing.assert_array_equal(counts, expected_counts[expected_counts > 0])
    assert counts.sum() == n
    if strategy == "quantile":
        assert counts.min() >= MIN_PER_BIN - 1


def test_segmentation_page_has_group_dice_intervals_and_overlaid_cases():
    from components.evaluation.html_report import Overlay, render_segmentation_html  # noqa: PLC0415

    report = {"n": 4, "n_patients": 4, "overall": {"dice": 0.8, "hd95": 2.0}, "ci95": {"dice": [0.7, 0.9]},
              "fairness": {"sex": {"dice_gap": 0.1, "es_dice": 0.7}},
              "groups": {"sex": {"F": {"n": 2, "dice": 0.75, "hd95": 2.5, "ci95": {"dice": [0.6, 0.85]}},
                                 "M": {"n": 2, "dice": 0.85, "hd95": 1.5, "ci95": {"dice": [0.8, 0.9]}}}}}
    truth = np.zeros((16, 16, 4), dtype=np.uint8)
    truth[4:10, 4:10, 2] = 1
    case = Overlay("case-a", np.random.default_rng(0).random((16, 16, 4)), truth, np.roll(truth, 2, axis=0), 0.67)
    page = render_segmentation_html(report, overlays=[case])
    assert "<td>0.600 – 0.850</td>" in page  # the group's interval in its table
    assert "Test cases" in page and "case-a" not in page.split("Test cases")[0]
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 2  # the Dice forest and the overlays
    assert "Test cases" not in render_segmentation_html(report)


def test_an_overlay_keeps_only_the_slice_the_page_draws():
    from components.evaluation.html_report import Overlay  # noqa: PLC0415

    rng = np.random.default_rng(1)
    image, truth = rng.random((16, 12, 5)).astype(np.float32), np.zeros((16, 12, 5), dtype=np.uint8)
    truth[2:6, 2:6, 1], truth[3:12, 3:9, 3] = 1, 1  # slice 3 has the most foreground
    prediction = np.roll(truth, 1, axis=0)
    shown = Overlay.shown("c", image, truth, prediction, 0.5)
    np.testing.assert_array_equal(shown.image, image[..., 3])
    np.testing.assert_array_equal(shown.prediction, prediction[..., 3])
    assert all(a.base is None for a in (shown.image, shown.truth, shown.prediction))  # copies: the volume can go
    flat = Overlay.shown("c", rng.random((8, 8, 3)), truth[..., 3][:8, :8], truth[..., 3][:8, :8], None)
    assert flat.image.shape == (8, 8)  # a 2D image's first channel
