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
