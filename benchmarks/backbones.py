"""Benchmark: pretrained backbones. Three measurements, each against a baseline in the same process:

1. Feature extraction: medflow's encoder (``HuggingFaceEncoder`` through ``predict_batches``) against the
   bare ``transformers`` forward pass (``Dinov2Model(pixel_values).pooler_output``) on the same
   preprocessed batches, in images/s (target: at least 0.95x); and, for context, medflow's whole path
   from the NIfTI files (reading and preprocessing included).
2. A linear probe on cached features against the same probe extracting them again (target: the
   re-run costs under a tenth).
3. LoRA against full fine-tuning: trainable parameters and the time of one training step.

The backbone is a DINOv2-small-shaped model (384 wide, 12 layers, 6 heads, patch 14) with random weights
saved in Hugging Face format (no weights can be downloaded here); images are 112x112 (64 patches).

    .venv/bin/python benchmarks/backbones.py [--write] [--images 480] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from report import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Backbones: feature extraction, cached probes, LoRA"
SIDE = 112


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--images", type=int, default=480, help="synthetic patients (about two images each)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import mlflow
    import pandas as pd
    import torch
    from monai.data import DataLoader
    from transformers import Dinov2Config, Dinov2Model

    from components.config import load_config
    from components.data.ingest import IngestSettings, ingest_export
    from components.data.synthetic import generate_export
    from components.training.backbones import load_backbone
    from components.training.heads import BackboneClassifier, add_lora
    from components.training.classification import train_classifier
    from components.training.forward import extract_features, predict_batches
    from components.training.preprocess import training_transforms

    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(tempfile.mkdtemp(prefix="medflow-bench-backbone-"))
    os.chdir(folder)
    torch.manual_seed(0)
    hf = folder / "dinov2-small-random"
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                             patch_size=14, image_size=SIDE)).save_pretrained(hf)
    export = generate_export(folder / "export", n_patients=args.images, image_size=64, seed=7)
    report, _ = ingest_export(source=export.folder, labels_csv=export.labels_csv, dataset_dir=folder / "data" / "d",
                              settings=IngestSettings(), salt=b"b" * 32)
    manifest = pd.read_parquet(report.manifest)
    overrides = [f"train.backbone.source={hf}", "train.device=cpu", "registry.experiment=bench", "train.epochs=20",
                 "train.batch_size=64", "data.image_size=64"]
    config = load_config(overrides=[*overrides, "train.backbone.regime=linear_probe"], environ={})
    backbone = load_backbone(config)
    encoder = backbone.encoder.eval()
    bare = Dinov2Model.from_pretrained(hf, local_files_only=True).eval()

    # 1. the same preprocessed batches through medflow's encoder and through the bare model
    transform = training_transforms(backbone.spec, augment=False)
    batch_size = 32
    images = [transform({"image": str(report.manifest.parent / p)})["image"] for p in manifest["image"]]
    batches = [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    loader = DataLoader([{"image": img} for img in images], batch_size=batch_size)
    cpu = torch.device("cpu")

    def ours() -> None:
        predict_batches(encoder, loader, cpu)

    def theirs() -> None:
        with torch.no_grad():
            for batch in batches:
                bare(pixel_values=batch).pooler_output

    def from_files() -> None:
        extract_features(encoder, backbone.spec, manifest, report.manifest.parent, cpu, batch_size=batch_size)

    ours()  # warm-up
    theirs()
    times = {"bare": [], "medflow": [], "files": []}
    order = [("bare", theirs), ("medflow", ours), ("files", from_files)]
    for repeat in range(args.repeat + 2):  # the order alternates, so neither side always runs first
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    n = len(images)
    bare_s, ours_s, files_s = min(times["bare"]), min(times["medflow"]), min(times["files"])

    # 2. a probe that extracts its features, then the same probe on the cached ones
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    start = time.perf_counter()
    first = train_classifier(manifest_path=report.manifest, data_version="bench", config=config)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    second = train_classifier(manifest_path=report.manifest, data_version="bench", config=config)
    warm = time.perf_counter() - start
    params = mlflow.MlflowClient().get_run(second.run_id).data.params
    assert params["backbone.features_reused"] == "True", "the second probe did not reuse the features"
    del first

    # 3. LoRA against full fine-tuning: trainable parameters, one training step on a batch
    def step_time(regime: str) -> tuple[int, float]:
        loaded = load_backbone(load_config(overrides=[*overrides, f"train.backbone.regime={regime}"], environ={}))
        network = BackboneClassifier(loaded.encoder, torch.nn.Linear(loaded.feature_dim, 2))
        if regime == "lora":
            network.encoder = add_lora(network.encoder, config.train.backbone, network="dinov2")
        network.train()
        trainable = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        batch, labels = batches[0], torch.zeros(len(batches[0]), dtype=torch.long)
        best = float("inf")
        for _ in range(args.repeat + 1):
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(batch), labels).backward()
            optimizer.step()
            best = min(best, time.perf_counter() - start)
        return sum(p.numel() for p in trainable), best

    full_params, full_step = step_time("finetune")
    lora_params, lora_step = step_time("lora")

    table = "\n".join([
        "| measurement | baseline | medflow | ratio |",
        "|---|---:|---:|---:|",
        f"| feature extraction, same preprocessed batches (images/s) | bare transformers {n / bare_s:.1f} "
        f"| {n / ours_s:.1f} | {bare_s / ours_s:.3f} |",
        f"| feature extraction from the NIfTI files (images/s) | bare forward {n / bare_s:.1f} "
        f"| {n / files_s:.1f} | {bare_s / files_s:.3f} |",
        f"| linear probe, {config.train.epochs} epochs (s) | extracting the features {cold:.2f} "
        f"| cached features {warm:.2f} | {warm / cold:.3f} |",
        f"| trainable parameters | full fine-tuning {full_params:,} | LoRA r={config.train.backbone.lora_rank} "
        f"{lora_params:,} | {lora_params / full_params:.4f} |",
        f"| one training step, batch {batch_size} (s) | full fine-tuning {full_step:.3f} | LoRA {lora_step:.3f} "
        f"| {lora_step / full_step:.3f} |",
    ])
    print(table)
    if args.write:
        section = (
            f"`make bench` (`benchmarks/backbones.py`) on {date.today().isoformat()}, {os.cpu_count()} CPU cores "
            f"(extraction on a GPU, with AMP, is still to be measured), Python "
            f"{platform.python_version()}, torch {torch.__version__}; a DINOv2-small-shaped backbone (384 wide, 12 "
            f"layers, patch 14) with random weights in Hugging Face format, {n} synthetic images at {SIDE}x{SIDE}, "
            f"extraction best of {args.repeat + 2} in alternating order, steps best of {args.repeat + 1}."
            f"\n\n{table}\n\n"
            f"Targets: extraction at least 0.95x the bare forward pass on the same batches: "
            f"{'met' if bare_s / ours_s >= 0.95 else 'not met'}; the probe on cached features under a tenth of "
            f"the probe that extracts them: {'met' if warm / cold < 0.1 else 'not met'}. Reading and preprocessing "
            f"the files (the second row) is what caching the features saves on every later probe; the cached "
            f"probe's time is MLflow's run bookkeeping and the head's epochs.\n"
        )
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
