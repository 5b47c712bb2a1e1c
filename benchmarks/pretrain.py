"""Benchmark: medflow's pretraining (SimCLR) against a bare loop on the same encoder, views, loss, batch and data.

Baseline, in the same process: a plain loop with MONAI's CacheDataset and DataLoader over the same two-view
transforms, the same DenseNet encoder and projection head, MONAI's ContrastiveLoss, AdamW, and a validation
pass over the val images each epoch, and nothing else. lightly's own training loop cannot be the baseline:
lightly imports torchvision, whose wheels do not load beside the CPU build of torch installed here.
medflow's ``pretrain_encoder`` adds MLflow logging (params, per-epoch metrics, the encoder artifact), the
collapse check, the intensity statistics and a resumable checkpoint every ``train.checkpoint_interval_s``
(by default once a minute and after the last epoch). Both are timed whole
(set-up included); each runs ``--repeat`` times, alternating, and the best time counts. Target: medflow
reaches at least 0.95 of the bare loop's images per second. Both train in the memory layout
``train.memory_format`` picks for the encoder (channels_last for the DenseNet).

    .venv/bin/python benchmarks/pretrain.py [--write] [--runs 2x64 4x64] [--repeat 2]
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
SECTION = "Pretraining: medflow vs a bare SimCLR loop"


def bare_simclr_loop(manifest_path: Path, config) -> int:
    """The same pretraining as medflow's, written as a plain loop; returns the images seen."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.utils import convert_to_tensor, set_determinism

    from components.data.ingest import load_manifest
    from components.pretraining.methods import ENCODER_CLASSES
    from components.pretraining.simclr import TwoViews, contrastive_loss
    from components.pretraining.views import view_transforms
    from components.training.pretrained import strip_head
    from components.training.models import build_classifier, classifier_kwargs, memory_format
    from components.training.preprocess import PreprocessSpec, intensity_stats

    cfg = config.pretrain
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent
    train_df, val_df = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]
    sample = train_df.sample(min(256, len(train_df)), random_state=cfg.seed)
    mean, std = intensity_stats(root / p for p in sample["image"])
    size = config.data.image_size
    spec = PreprocessSpec(spatial_size=(size, size), mean=mean, std=std)
    set_determinism(seed=cfg.seed)
    records = lambda df: [{"image": str(root / i), "label": 0} for i in df["image"]]  # noqa: E731
    train_ds = CacheDataset(records(train_df), view_transforms(spec, cfg), progress=False)
    val_ds = CacheDataset(records(val_df), view_transforms(spec, cfg), progress=False)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, drop_last=True)
    network = build_classifier(cfg.model, spatial_dims=2, in_channels=1, num_classes=ENCODER_CLASSES,
                               kwargs=classifier_kwargs(cfg.model, image_size=size, kwargs=cfg.model_kwargs))
    encoder, feature_dim, _ = strip_head(network, ENCODER_CLASSES)
    model = TwoViews(encoder, feature_dim, cfg.projection_dim)
    model.to(memory_format=memory_format(config.train.memory_format, model))  # the layout medflow trains in
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = contrastive_loss(cfg.temperature)
    for _ in range(cfg.epochs):
        model.train()
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(convert_to_tensor(batch["image"], track_meta=False)))  # as medflow
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for batch in val_loader:
                loss_fn(model(convert_to_tensor(batch["image"], track_meta=False)))
    return len(train_df) * cfg.epochs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--runs", nargs="+", default=["2x64", "4x64"], help="one row per EPOCHSxIMAGE_SIZE")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--patients", type=int, default=200)
    args = parser.parse_args()

    import torch

    from components.config import load_config
    from components.data.ingest import IngestSettings, ingest_export
    from components.data.synthetic import generate_export
    from components.pretraining.pretrain import pretrain_encoder

    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(tempfile.mkdtemp(prefix="medflow-bench-pretrain-"))
    os.chdir(folder)
    manifests, rows = {}, []
    for run in args.runs:
        epochs, size = (int(v) for v in run.split("x"))
        if size not in manifests:
            export = generate_export(folder / f"export{size}", n_patients=args.patients, image_size=size, seed=7)
            manifests[size], _ = ingest_export(source=export.folder, labels_csv=export.labels_csv,
                                               dataset_dir=folder / "data" / f"d{size}", settings=IngestSettings(),
                                               salt=b"b" * 32)
        report = manifests[size]
        config = load_config(overrides=[f"pretrain.epochs={epochs}", f"data.image_size={size}", "train.device=cpu",
                                        "pretrain.experiment=bench", "train.resume=false"], environ={})
        bare_times, medflow_times, images = [], [], 0
        bare_simclr_loop(report.manifest, config.model_copy(update={"pretrain": config.pretrain.model_copy(
            update={"epochs": 1})}))  # warm-up: imports, first-use initialisation
        for _ in range(args.repeat):
            start = time.perf_counter()
            images = bare_simclr_loop(report.manifest, config)
            bare_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            pretrain_encoder(manifest_path=report.manifest, data_version="bench", config=config)
            medflow_times.append(time.perf_counter() - start)
        rows.append((epochs, size, min(bare_times), min(medflow_times), images))
    table = "\n".join([
        "| epochs | image | bare SimCLR loop (s) | images/s | medflow `pretrain_encoder` (s) | images/s | medflow / bare |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {e} | {z}x{z} | {b:.2f} | {n / b:.1f} | {m:.2f} | {n / m:.1f} | {b / m:.3f} |" for e, z, b, m, n in rows],
    ])
    print(table)
    if args.write:
        section = (
            f"`make bench` (`benchmarks/pretrain.py`) on {date.today().isoformat()}, {os.cpu_count()} CPU cores, one "
            f"rank (pretraining on a GPU has not been measured), Python {platform.python_version()}, "
            f"torch {torch.__version__}; SimCLR on "
            f"{config.pretrain.model}, {rows[0][4] // rows[0][0]} training images, batch {config.pretrain.batch_size}, "
            f"best of {args.repeat} alternating runs. The baseline is a bare loop on the same views, encoder, "
            f"projection head and MONAI loss (lightly's loop cannot run here: it needs torchvision), both in the "
            f"layout `train.memory_format: auto` picks (channels_last), through medflow's view transforms (on "
            f"plain tensors).\n\n"
            f"{table}\n\nTarget (at least 0.95 of the bare loop's images/s): "
            + "; ".join(f"{e}x{z} {'met' if b / m >= 0.95 else 'not met'}" for e, z, b, m, _ in rows)
            + ". medflow pays a fixed cost per run whatever its length (the MLflow run with its params and dataset "
            "input, the intensity statistics, the encoder artifact) and a resumable checkpoint once a minute "
            "(`train.checkpoint_interval_s`) and after the last epoch; over the "
            "tens of epochs of real pretraining the fixed cost counts less. Run-to-run noise on this 2-core "
            "machine is several per cent, as large as the difference between the rows. Two ranks (torchrun) were "
            "not measured: on 2 cores they would share the cores the single rank already uses.\n"
        )
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
