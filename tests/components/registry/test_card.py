from __future__ import annotations

import pandas as pd
import pytest

from components.data.ingest import load_manifest
from components.registry.card import card_columns, model_card_markdown, write_model_card
from components.registry.gates import GateResult
from components.registry.promote import PromotionDecision

REPORT = {
    "task": "binary", "n": 40, "n_patients": 20,
    "overall": {"auc": 0.91, "ece": 0.05},
    "ci95": {"auc": [0.85, 0.95], "ece": [0.02, 0.08]},
    "groups": {"sex": {"F": {"n": 20, "auc": 0.88, "sensitivity": 0.8, "specificity": 0.9, "ece": 0.06},
                       "M": {"n": 20, "auc": 0.93, "sensitivity": 0.85, "specificity": 0.9, "ece": 0.04}}},
    "fairness": {"sex": {"auc_gap": 0.05, "es_auc": 0.87, "equalized_odds_difference": 0.1,
                         "demographic_parity_difference": 0.02}},
}
CALIBRATION = {"temperature": 1.3, "before": {"ece": 0.1, "mce": 0.2, "brier": 0.1, "nll": 0.4},
               "after": {"ece": 0.05, "mce": 0.1, "brier": 0.09, "nll": 0.3}}


def test_card_holds_every_section_and_renders_as_html(tmp_path):
    manifest = pd.DataFrame({"split": ["train", "test", "test"], "patient_id": ["a", "b", "c"],
                             "label": [1, 0, 1], "sex": ["F", "M", "F"]})
    decision = PromotionDecision(
        model_name="m", version="4", promoted=False, champion_before="3", champion_after="3",
        gates=(GateResult("fairness.sex.auc_gap", "<=", 0.03, 0.05, False, "fairness.sex.auc_gap <= 0.03 fails"),),
        reason="failed: fairness.sex.auc_gap <= 0.03 fails",
    )
    text = model_card_markdown(model_name="m", version="4", lineage={"medflow.data_version": "abc"}, report=REPORT,
                               calibration=CALIBRATION, manifest=manifest, attributes=["sex"], decision=decision)
    for heading in ("Intended use", "Lineage", "Data", "Performance on the test split", "Calibration", "Fairness",
                    "Promotion decision"):
        assert f"## {heading}" in text
    assert "| auc | 0.9100 | 0.8500 | 0.9500 |" in text
    assert "after (T = 1.300)" in text and "Version 4 was **refused**" in text
    assert "| F | 1 | 0 | 1 |" in text  # composition of sex by split
    md, html = write_model_card(text, tmp_path)
    page = html.read_text()
    assert md.read_text() == text
    assert page.count("<table>") == sum(line.startswith("|---") for line in text.splitlines()) == 7 and "<h1>Model card: m version 4</h1>" in page


@pytest.mark.parametrize("task", ["binary", "segmentation"])
def test_the_card_from_its_columns_alone_is_the_card_from_the_whole_manifest(tmp_path, task):
    n = 12
    manifest = pd.DataFrame({
        "case_id": [f"c{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
        "split": ["train", "train", "val", "test"] * 3, "image": [f"images/c{i}.nii.gz" for i in range(n)],
        "label": [i % 2 for i in range(n)] if task == "binary" else [f"labels/c{i}.nii.gz" for i in range(n)],
        "foreground": [i / 100 for i in range(n)], "sex": ["F", "M", "F"] * 4, "site": ["a", "b"] * 6,
        "race": ["x", "y", "z", "x"] * 3, "shape": ["32x32"] * n, "sha256": [f"{i:064x}" for i in range(n)],
    })
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path)
    decision = PromotionDecision(model_name="m", version="2", promoted=True, champion_before=None,
                                 champion_after="2", gates=(), reason="passed")
    attributes = ["sex", "site", "race"]
    report = {"task": task, "n": 3, "n_patients": 3, "overall": {}}
    cards = [model_card_markdown(model_name="m", version="2", lineage={}, report=report,
                                 calibration=None, manifest=m, attributes=attributes, decision=decision)
             for m in (load_manifest(path), load_manifest(path, columns=card_columns(attributes)))]
    assert cards[0] == cards[1]
    assert "| race | train | val | test |" in cards[0] and "| test | 3 | 3 |" in cards[0]
    assert set(load_manifest(path, columns=card_columns(attributes)).columns).isdisjoint({"image", "sha256", "shape"})
