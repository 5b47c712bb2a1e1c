"""Benchmark: medflow's transform pipelines on plain tensors against MONAI's Compose of the same transforms.

Every pipeline medflow builds (classification training and validation, the pretraining views, segmentation
patches) is a ``PlainCompose``: MONAI's metadata tracking is off while it runs. Baseline, in the same process:
MONAI's own ``Compose`` of the same transform objects, which hands MetaTensors from one transform to the next.
Both give the same tensors, bit for bit (tests/components/training/test_preprocess.py). Two figures per
pipeline, per image, alternating, best of ``--repeat``:

- cached: the part a cache cannot keep, from the first random transform on, run on an item the cache holds
  (what every epoch after the first costs a DataLoader worker);
- whole: every transform from the file on (no cache, or the first epoch).

The last column is how many images a second one DataLoader worker (or the main process) can hand the network
from the cache: what a GPU's appetite is divided by to size ``train.num_workers``.

    .venv/bin/python benchmarks/transforms.py [--write] [--repeat 3] [--images 40]
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
SECTION = "Transforms: plain tensors vs MetaTensors"


def per_image(pipeline, items: list[dict], *, cached: bool) -> float | None:
    """Seconds per image of ``pipeline`` over ``items`` (from the first random transform on, over items the
    deterministic part has already made, when ``cached``; None when nothing is random: a cache keeps it all)."""
    from monai.transforms import RandomizableTrait, Transform

    pipeline.set_random_state(0)
    if cached:
        first = pipeline.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
        if first is None:
            return None
        inputs = [pipeline(dict(item), end=first) for item in items]
        start = time.perf_counter()
        for item in inputs:
            pipeline(dict(item), start=first)
    else:
        start = time.perf_counter()
        for item in items:
            pipeline(dict(item))
    return (time.perf_counter() - start) / len(items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=int, default=40, help="images (volumes: a quarter) per pipeline")
    args = parser.parse_args()

    import nibabel as nib
    import numpy as np
    import torch
    from monai.transforms import Compose

    from components.config import PretrainConfig
    from components.pretraining.views import view_transforms
    from components.training.preprocess import (
        PreprocessSpec,
        SegmentationSpec,
        segmentation_transforms,
        training_transforms,
    )

    torch.set_num_threads(1)  # as in a DataLoader worker
    folder = Path(tempfile.mkdtemp(prefix="medflow-bench-transforms-"))
    rng = np.random.default_rng(0)

    def images(size: int) -> list[dict]:
        out = []
        for i in range(args.images):
            path = folder / f"{size}-{i}.nii.gz"
            nib.save(nib.Nifti1Image(rng.normal(100, 30, (size, size)).astype(np.float32), np.eye(4)), path)
            out.append({"image": str(path), "label": i % 2})
        return out

    def volumes(shape: tuple[int, int, int]) -> list[dict]:
        out = []
        for i in range(max(2, args.images // 4)):
            image, mask = folder / f"v{i}.nii.gz", folder / f"m{i}.nii.gz"
            nib.save(nib.Nifti1Image(rng.normal(0, 1, shape).astype(np.float32), np.eye(4)), image)
            nib.save(nib.Nifti1Image((rng.random(shape) > 0.9).astype(np.uint8), np.eye(4)), mask)
            out.append({"image": str(image), "label": str(mask)})
        return out

    small, large = images(64), images(256)
    spec = {size: PreprocessSpec(spatial_size=(size, size), mean=100.0, std=30.0) for size in (64, 224)}
    segmentation = SegmentationSpec(patch_size=(64, 64, 32), mean=0.0, std=1.0)
    pipelines = [
        ("classification training", "64x64 → 64x64", lambda: training_transforms(spec[64], augment=True), small),
        ("classification training", "256x256 → 224x224", lambda: training_transforms(spec[224], augment=True),
         large),
        ("validation", "256x256 → 224x224", lambda: training_transforms(spec[224], augment=False), large),
        ("pretraining, 2 views", "64x64 → 64x64", lambda: view_transforms(spec[64], PretrainConfig()), small),
        ("pretraining, 2 views", "256x256 → 224x224", lambda: view_transforms(spec[224], PretrainConfig()), large),
        ("segmentation, 4 patches", "128x128x64, patch 64x64x32",
         lambda: segmentation_transforms(segmentation, augment=True), volumes((128, 128, 64))),
    ]
    rows = []
    for name, size, make, items in pipelines:
        plain = make()
        tracked = Compose(make().transforms)  # MONAI's Compose of the same transforms: MetaTensors throughout
        times: dict[tuple[str, bool], list[float]] = {}
        for cached in (True, False):
            per_image(plain, items[:2], cached=cached)  # warm-up
            per_image(tracked, items[:2], cached=cached)
            for _ in range(args.repeat):
                times.setdefault(("medflow", cached), []).append(per_image(plain, items, cached=cached))
                times.setdefault(("monai", cached), []).append(per_image(tracked, items, cached=cached))
        best = {key: None if None in values else min(values) for key, values in times.items()}
        rows.append((name, size, best[("monai", True)], best[("medflow", True)], best[("monai", False)],
                     best[("medflow", False)]))
        print(f"{name} {size}: whole {best[('monai', False)] * 1e3:.2f} → {best[('medflow', False)] * 1e3:.2f} ms",
              flush=True)
    table = "\n".join([
        "| pipeline | images | cached, MONAI Compose (ms/image) | cached, medflow (ms/image) | cached speed-up "
        "| whole, MONAI Compose (ms/image) | whole, medflow (ms/image) | whole speed-up "
        "| images/s one worker feeds from the cache |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *[(f"| {name} | {size} | {mc * 1e3:.2f} | {pc * 1e3:.2f} | {mc / pc:.2f}x " if pc else
           f"| {name} | {size} | nothing random: the cache keeps it all | | ")
          + f"| {mw * 1e3:.2f} | {pw * 1e3:.2f} | {mw / pw:.2f}x | {f'{1 / pc:,.0f}' if pc else ''} |"
          for name, size, mc, pc, mw, pw in rows],
    ])
    print(table)
    if args.write:
        import monai

        section = (
            f"`make bench` (`benchmarks/transforms.py`) on {date.today().isoformat()}, {os.cpu_count()} CPU cores, "
            f"one thread (as in a DataLoader worker), Python {platform.python_version()}, torch {torch.__version__}, "
            f"MONAI {monai.__version__}; {args.images} images ({max(2, args.images // 4)} volumes) per pipeline, "
            f"best of {args.repeat} alternating runs. Baseline: MONAI's `Compose` of the same transform objects, "
            f"which passes MetaTensors between them; medflow's pipelines are a `PlainCompose`, MONAI's metadata "
            f"tracking off while they run (the outputs are equal bit for bit). *Cached* is what every epoch "
            f"after the first costs: the transforms from the first random one on, on an item a cache holds (a "
            f"cache's copy of the item not included). *Whole* is every transform from the file on.\n\n{table}\n\n"
            f"The last column is an upper bound on what one worker hands a GPU from the cache; a GPU that takes N "
            f"images a second needs about N divided by it in `train.num_workers`, before the collation and the "
            f"copy to the device.\n"
        )
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
