"""Benchmark: a training step and a prediction of each network in the contiguous layout and in channels_last.

For every classifier medflow names (``components.training.models.CLASSIFIERS``) at 64x64, the demo's narrow
DenseNet, three 2D segmentation networks and a 3D UNet: a training step (forward, backward, AdamW) and a
prediction (forward in eval mode, no gradients) on random images of one channel, timed in both memory layouts
of the same network in this process, alternating, best of ``--repeat``. The last column is what
``train.memory_format: auto`` picks for the network. Baseline: the contiguous layout, which medflow trained in
before ``train.memory_format`` existed.

    .venv/bin/python benchmarks/layouts.py [--write] [--repeat 3] [--steps 5]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Training step: memory layouts"


def step_seconds(make, shape: tuple[int, ...], layout, *, steps: int) -> tuple[float, float]:
    """Seconds per training step, then per prediction, of a fresh network from ``make`` in ``layout``, each
    after one warm-up call."""
    import torch

    torch.manual_seed(0)
    network = make().to(memory_format=layout)
    optimizer = torch.optim.AdamW(network.parameters())
    images = torch.randn(*shape)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        network(images).float().square().mean().backward()
        optimizer.step()
    training = (time.perf_counter() - start) / steps
    network.eval()
    with torch.no_grad():
        for i in range(steps + 1):
            if i == 1:
                start = time.perf_counter()
            network(images)
    return training, (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import torch

    from components.config import load_config
    from components.training.models import (
        CLASSIFIERS, build_classifier, build_segmenter, classifier_kwargs, memory_format,
    )

    torch.set_num_threads(os.cpu_count() or 1)
    def segmenter(name: str, dims: int, patch: tuple[int, ...], kwargs: dict | None = None):
        return lambda: build_segmenter(name, spatial_dims=dims, in_channels=1, num_classes=2, patch_size=patch,
                                       kwargs=kwargs)

    unet = {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]}
    demo = load_config(environ={}).train.model_kwargs  # the demo's narrow DenseNet
    networks = [
        *[(f"{name}, 64x64, batch 16", lambda name=name: build_classifier(
            name, spatial_dims=2, in_channels=1, num_classes=2, kwargs=classifier_kwargs(name, image_size=64)),
           (16, 1, 64, 64), False) for name in CLASSIFIERS],
        ("densenet with the demo's widths, 64x64, batch 32", lambda: build_classifier(
            "densenet", spatial_dims=2, in_channels=1, num_classes=2, kwargs=demo), (32, 1, 64, 64), False),
        ("unet 2D, 128x128, batch 8", segmenter("unet", 2, (128, 128), unet), (8, 1, 128, 128), True),
        ("attentionunet 2D, 128x128, batch 8", segmenter("attentionunet", 2, (128, 128), unet), (8, 1, 128, 128), True),
        ("segresnet 2D, 128x128, batch 8", segmenter("segresnet", 2, (128, 128)), (8, 1, 128, 128), True),
        ("unet 3D, 32x32x16, batch 4", segmenter("unet", 3, (32, 32, 16), unet), (4, 1, 32, 32, 16), True),
    ]
    rows = []
    for label, make, shape, dense in networks:
        network = make()
        channels_last = memory_format("channels_last", network)
        auto = memory_format("auto", network, dense=dense)
        picked = "contiguous" if auto is torch.contiguous_format else "channels_last"
        times = {"contiguous": [], "channels_last": []}
        for _ in range(args.repeat):
            times["contiguous"].append(step_seconds(make, shape, torch.contiguous_format, steps=args.steps))
            times["channels_last"].append(step_seconds(make, shape, channels_last, steps=args.steps))
        best = {key: [min(t[i] for t in values) for i in (0, 1)] for key, values in times.items()}
        rows.append((label, *best["contiguous"], *best["channels_last"], picked))
        print(rows[-1], flush=True)
    table = "\n".join([
        "| network | training step, contiguous (ms) | channels_last (ms) | speed-up | prediction, contiguous (ms) "
        "| channels_last (ms) | speed-up | `auto` picks |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {label} | {c * 1000:.0f} | {cl * 1000:.0f} | {c / cl:.2f}x | {pc * 1000:.0f} | {pcl * 1000:.0f} "
          f"| {pc / pcl:.2f}x | {picked} |" for label, c, pc, cl, pcl, picked in rows],
    ])
    print(table)
    if args.write:
        section = (
            f"`make bench` (`benchmarks/layouts.py`) on {date.today().isoformat()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}; one training step (forward, backward, "
            f"AdamW) and one prediction (eval mode, no gradients; evaluation, `medflow predict` and the served model "
            f"predict in the layout `auto` picks) on random one-channel images, each network in both layouts in one "
            f"process, best of {args.repeat} alternating runs of {args.steps} calls each after a warm-up call. "
            f"Channels_last on a volume "
            f"network is PyTorch's channels_last_3d. Baseline: the contiguous layout, which every network trained in "
            f"before `train.memory_format`; `auto` picks channels_last for a network that classifies or embeds 2D "
            f"images and whose weights are mostly 2D convolutions; segmentation networks (dense outputs) stay "
            f"contiguous.\n\n{table}\n"
        )
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
