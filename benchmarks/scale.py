"""Benchmark: time and peak memory of every step against the number of cases, with the slope of each.

For each size N: a synthetic DICOM export of about N images (two per patient on
average) at ``--image`` pixels is generated (not a step: it stands for the
hospital's export), then each step of ``medflow run`` runs as a plain call in a
fresh process of its own, one after another in one workspace: ingest (DICOM to
NIfTI, pseudonyms, splits), version (``dvc add``, push, commit), validate,
train (``--epochs`` epochs, ``train.cache: auto`` under ``train.cache_max_gb``),
evaluate (predictions, the bootstrap, report.json and report.html, the model
card), register and promote. A step's peak memory is the largest memory (PSS,
shared pages divided among their sharers) of its process and its children
(DataLoader workers, conversion processes, dvc), sampled on a thread, or the
step process's own peak resident memory (the kernel's VmHWM) where that is
larger; the table gives it above that of a process that has only imported the
steps. The slope of a step is the exponent b of time ~ N^b between the two
largest sizes (1: linear).

Each export's images are deleted once ingested (the disk holds one size at a time; 100,000 images need about
56 GB for the dataset, DVC's cache and remote, and the training cache).

Then, at the largest size (or ``--loops-at``) and in one process, the training rows: a bare MONAI
loop with the cache medflow chose and the same DataLoader workers, the same
bare loop with no workers, and medflow's ``train_classifier``, each
``--epochs`` epochs from a cold cache, best of ``--repeat``.

Then the whole ``medflow run`` (a new process, Prefect's ephemeral server
included) at each of ``--runs`` images with ``train.cache_max_gb`` set: the peak
memory (PSS) of its process tree.

Finally full-size volumes (their own section): for each of ``--volumes`` CT series
of ``--volume-shape`` voxels (synthetic, written as DICOM, one file a slice, with
NIfTI masks), the same steps as plain calls in fresh processes on the segmentation
demo's config: ingest (reading each series file by file into its volume), version,
validate, train (one epoch of patches), evaluate (sliding window over whole
volumes), register and promote, with their times, peaks and slopes.

    .venv/bin/python benchmarks/scale.py [--write] [--sizes 1000 10000 100000] [--loops-at 10000] [--runs 400 4000]
                                         [--volumes 6 10] [--volume-shape 512 512 300]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

from report import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.steps import STEPS  # noqa: E402

RETRAIN = tuple(s.name for s in STEPS if s.flow == "retrain")  # medflow run's steps
SECTION = "Scale: steps against the number of cases"
VOLUME_SECTION = "Scale: full-size CT volumes"
SEGMENTATION_CONFIG = REPO / "components" / "configs" / "demo-segmentation.yaml"
VOLUME_BATCH = 2  # whole volumes per batch, each cropped to train.samples_per_volume patches (MONAI's practice)
GB = 2**30
SAMPLER_SHARE = 19  # the peak sampler waits 19x as long as a reading took: 5 % of a core
NOT_MEASURED = (  # what the section says is left
    "Not measured yet: these steps on a GPU (the training step alone on an H200 is in the GPU section). "
    "100,000 images have a section of their own below, and CT "
    "volumes another. On 2 cores the DataLoader workers share the cores the network trains on, "
    "so they add nothing here; they pay where the accelerator waits for the transforms. Evaluation reads and "
    "preprocesses the val and test images again (in `train.num_workers` processes), and the shortcut audit embeds at "
    "most `evaluate.shortcut_train_cases` (20,000) of the training split's cases (the test split's features come from "
    "the pass that predicts it)."
)


class PeakSampler:
    """The largest summed proportional set size (PSS: shared pages split among the processes sharing them, so
    forked workers are not counted twice) of a process and its descendants, sampled on a thread, or the
    process's own peak resident memory where that is larger."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        import psutil  # noqa: PLC0415

        self._process, self._every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree_pss(self) -> int:
        import psutil  # noqa: PLC0415

        total = 0
        try:
            processes = [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            return 0
        for process in processes:
            try:
                total += process.memory_full_info().pss
            except psutil.Error:  # ended between the listing and the reading
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self.peak = max(self.peak, self._tree_pss())
            # reading PSS walks every page of the process: for a process of several GB that is tens of ms, and
            # sampling every 50 ms took half a core from the step it measured; at most 5 % of a core instead
            self._stop.wait(max(self._every, SAMPLER_SHARE * (time.perf_counter() - start)))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        # the kernel's high-water mark of the process's own resident memory: exact where the samples, taken
        # seconds apart on a multi-GB process, miss a short peak (two runs of the same training read 5.69 and
        # 6.28 GB). It counts pages shared with forked workers in full: they exist once, so it is still a floor
        # of the whole tree's memory at that moment.
        self.peak = max(self.peak, self._tree_pss(), high_water_mark(self._process.pid))


def high_water_mark(pid: int) -> int:
    """Peak resident memory (VmHWM) of a process in bytes; 0 where /proc does not say (not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child_step(name: str, args: tuple, overrides: list[str], workspace: str, config_path: str | None = None):
    """One step as a plain call in this (fresh) process: its output, seconds and peak bytes."""
    from flows.cli import quiet_libraries  # noqa: PLC0415

    quiet_libraries()
    from components.config import load_config  # noqa: PLC0415
    from components.steps import get_step  # noqa: PLC0415

    os.chdir(workspace)
    config = load_config(Path(config_path) if config_path else None, overrides=overrides, environ={})
    functions = {step: get_step(step).resolve() for step in RETRAIN}  # every import before the clock starts
    if name == "imports":
        with PeakSampler(os.getpid()) as sampler:
            pass
        return None, 0.0, sampler.peak
    with PeakSampler(os.getpid()) as sampler:
        start = time.perf_counter()
        out = functions[name](*args, config)
        elapsed = time.perf_counter() - start
    return out, elapsed, sampler.peak


def _in_fresh_process(function, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def run_steps(workspace: Path, overrides: list[str], config_path: Path | None = None, *,
              after_ingest=None) -> dict[str, tuple[float, int]]:
    """Seconds and peak bytes of each step, each in a fresh process, the outputs passed along; ``after_ingest``
    (untimed) runs between ingest and the next step."""
    chain = {"ingest": lambda o: (), "version": lambda o: (o["ingest"],), "validate": lambda o: (o["version"],),
             "train": lambda o: (o["version"], o["validate"]), "evaluate": lambda o: (o["train"].run_id, o["version"]),
             "register": lambda o: (o["evaluate"], o["version"]),
             "promote": lambda o: (o["register"], o["evaluate"], o["version"])}
    outputs, figures = {}, {}
    for name in RETRAIN:
        out, seconds, peak = _in_fresh_process(_child_step, name, chain[name](outputs), overrides, str(workspace),
                                               str(config_path) if config_path else None)
        outputs[name], figures[name] = out, (seconds, peak)
        print(f"  {name}: {seconds:.1f} s, peak {peak / GB:.2f} GB", flush=True)
        if name == "ingest" and after_ingest is not None:
            after_ingest()
    return figures


def _child_training(manifest: str, overrides: list[str], workspace: str, repeat: int) -> dict[str, float]:
    """Samples/s of the bare loops and of medflow's ``train_classifier`` (best of ``repeat``), from cold caches."""
    import multiprocessing  # noqa: PLC0415

    multiprocessing.set_start_method("fork", force=True)  # the bare loops fork their workers, as in a main process
    from flows.cli import quiet_libraries  # noqa: PLC0415

    quiet_libraries()
    from training import bare_monai_loop  # noqa: PLC0415

    from components import paths  # noqa: PLC0415
    from components.config import load_config  # noqa: PLC0415
    from components.training.classification import train_classifier  # noqa: PLC0415
    from components.training.datasets import plan_cache  # noqa: PLC0415

    os.chdir(workspace)
    config = load_config(overrides=overrides, environ={})
    cfg, manifest_path = config.train, Path(manifest)
    import pandas as pd  # noqa: PLC0415

    frame = pd.read_parquet(manifest_path)
    n = int(frame["split"].isin(["train", "val"]).sum())
    plan = plan_cache(cfg, n_samples=n, sample_bytes=4 * config.data.image_size**2)
    times: dict[str, list[float]] = {"bare": [], "bare, no workers": [], "medflow": []}
    samples = 0
    for _ in range(repeat):
        for label, workers in (("bare", cfg.num_workers), ("bare, no workers", 0)):
            cache_dir = Path(tempfile.mkdtemp(prefix="bare-cache-", dir=workspace))
            start = time.perf_counter()
            samples = bare_monai_loop(manifest_path, config, cache=plan.mode, num_workers=workers, cache_dir=cache_dir)
            times[label].append(time.perf_counter() - start)
            print(f"  {label}: {samples / times[label][-1]:.1f} samples/s", flush=True)
            shutil.rmtree(cache_dir)
        shutil.rmtree(paths.medflow_home() / "cache", ignore_errors=True)  # medflow's disk cache, cold like the bare one
        start = time.perf_counter()
        train_classifier(manifest_path=manifest_path, data_version="bench", config=config)
        times["medflow"].append(time.perf_counter() - start)
        print(f"  medflow: {samples / times['medflow'][-1]:.1f} samples/s", flush=True)  # each run: the spread
    # each round's medflow run against that round's bare loop: the machine's speed drifts between rounds
    rounds = [bare / ours for bare, ours in zip(times["bare"], times["medflow"])]
    return {label: samples / min(seconds) for label, seconds in times.items()} | {"cache": plan.mode, "rounds": rounds}


def run_cli_peak(folder: Path, overrides: list[str]) -> tuple[float, int]:
    """Wall seconds and peak bytes (PSS of the process tree) of ``medflow run`` in a fresh workspace."""
    folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MEDFLOW"))}
    command = [str(Path(sys.executable).with_name("medflow")), "run", *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with PeakSampler(process.pid) as sampler:
        output = process.communicate()[0].decode()
    if process.returncode not in (0, 3):  # 3: trained, not promoted
        raise RuntimeError(f"medflow run exited {process.returncode}: {output[-2000:]}")
    return time.perf_counter() - start, sampler.peak


def step_table(counts: list[int], steps: list[dict], imports: int, unit: str) -> str:
    """Rows of each step's seconds and peak above ``imports`` per count (``unit``); with two counts or more, the
    slope of the seconds and the growth of the peak between the last two (one count has neither)."""
    several = len(counts) > 1
    head = " | ".join(f"{c:,}{' ' + unit if unit else ''} (s)" for c in counts)
    peaks = " | ".join(f"{c:,}{' ' + unit if unit else ''} (GB)" for c in counts)
    lines = [f"| step | {head} | " + ("slope | " if several else "") + f"{peaks} |"
             + (" peak growth, last two (GB) |" if several else ""),
             "|---|" + "---:|" * (2 * len(counts) + 2 * several)]
    for name in RETRAIN:
        seconds = [figures[name][0] for figures in steps]
        above = [(figures[name][1] - imports) / GB for figures in steps]
        lines.append(f"| {name} | " + " | ".join(f"{t:.1f}" for t in seconds)
                     + (f" | {slope(counts, seconds):.2f}" if several else "")
                     + " | " + " | ".join(f"{p:.2f}" for p in above)
                     + (f" | {above[-1] - above[-2]:+.2f}" if several else "") + " |")
    return "\n".join(lines)


def run_volumes(root: Path, counts: list[int], shape: tuple[int, int, int], train_overrides: list[str],
                cache_gb: float) -> list[dict[str, tuple[float, int]]]:
    """Each step's seconds and peak bytes on ``count`` synthetic CT series of ``shape``, for each count."""
    from components.data.synthetic_segmentation import generate_segmentation_export  # noqa: PLC0415

    rows, cols, depth = shape
    if rows != cols:
        raise SystemExit(f"--volume-shape: the synthetic series have square slices, not {rows}x{cols}")
    figures = []
    for count in counts:
        folder = root / f"volumes{count}"
        print(f"{count} volumes of {rows}x{cols}x{depth}: generating the export", flush=True)
        start = time.perf_counter()
        export = generate_segmentation_export(folder / "export", n_patients=count, image_size=rows, depth=depth,
                                              fmt="dicom", seed=1)
        print(f"  generated in {time.perf_counter() - start:.0f} s", flush=True)
        overrides = ["data.format=dicom", f"data.source={export.folder}", f"data.labels={export.labels_csv}",
                     "data.name=scale-ct", "validation.min_group_size=1",  # a few volumes: groups of one or two
                     *train_overrides, f"train.batch_size={VOLUME_BATCH}", f"train.cache_max_gb={cache_gb}"]
        (folder / "ws").mkdir()
        figures.append(run_steps(folder / "ws", overrides, SEGMENTATION_CONFIG))
        shutil.rmtree(folder)  # the disk holds one count at a time
    return figures


def _drop_images(export) -> None:
    """Delete the export's images once ingested (its labels file stays): the workspace holds the dataset, and at
    100,000 images of 256x256 the export is another 13 GB of disk."""
    for path in export.folder.rglob("*"):
        if path.is_file() and path != export.labels_csv:
            path.unlink()


def slope(sizes: list[int], values: list[float]) -> float:
    """The exponent b of value ~ size^b between the two largest sizes (NaN with one size)."""
    if len(sizes) < 2:
        return float("nan")
    (n1, v1), (n2, v2) = list(zip(sizes, values))[-2:]
    return math.log(v2 / v1) / math.log(n2 / n1) if v1 > 0 and v2 > 0 else float("nan")


def _end_children_on_sigterm() -> None:
    """SIGTERM ends this process's step processes too. Ctrl-C reaches the whole process group, but a SIGTERM sent
    to this process alone left the running step's fresh process (and its workers) running without it."""
    def end(signum, _frame):
        import psutil  # noqa: PLC0415

        for child in psutil.Process().children(recursive=True):
            try:
                child.terminate()
            except psutil.Error:  # ended meanwhile
                pass
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000], help="images per dataset")
    parser.add_argument("--runs", type=int, nargs="*", default=[400, 4000], help="images of the whole-run rows")
    parser.add_argument("--image", type=int, default=256, help="rows and columns of each image")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="train.num_workers")
    parser.add_argument("--cache-max-gb", type=float, default=0.25)
    parser.add_argument("--repeat", type=int, default=1, help="training rows: best of this many")
    parser.add_argument("--loops-at", type=int, default=None,
                        help="the size (one of --sizes) of the training rows; default the largest, 0 none")
    parser.add_argument("--volumes", type=int, nargs="*", default=[], help="CT series per dataset (none: no volume rows)")
    parser.add_argument("--volume-shape", type=int, nargs=3, default=[512, 512, 300], metavar=("ROWS", "COLS", "SLICES"))
    parser.add_argument("--volume-cache-gb", type=float, default=4.0,
                        help="train.cache_max_gb of the volume rows (a batch of two full-size volumes is 2.3 GB)")
    args = parser.parse_args()
    _end_children_on_sigterm()
    for key in [k for k in os.environ if k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MEDFLOW"))]:
        del os.environ[key]

    sizes, counts = sorted(args.sizes), sorted(args.volumes)
    train_overrides = [f"train.epochs={args.epochs}", f"train.num_workers={args.workers}",
                       f"train.cache_max_gb={args.cache_max_gb}"]
    root = Path(tempfile.mkdtemp(prefix="medflow-bench-scale-"))
    imports = _in_fresh_process(_child_step, "imports", (), [], str(root))[2]
    setting = (f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}")
    command = "python benchmarks/scale.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
    try:
        images = (_images_section(args, root, imports, train_overrides, command=command, setting=setting)
                  if sizes else None)
        volumes = (run_volumes(root, counts, tuple(args.volume_shape), train_overrides, args.volume_cache_gb)
                   if counts else None)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if volumes:
        rows, cols, depth = args.volume_shape
        table = step_table(counts, volumes, imports, "volumes")
        gb = rows * cols * depth * 4 / GB
        print(table)
        if args.write:
            write_section(VOLUME_SECTION, (
                f"`{command}` on {date.today().isoformat()}, {setting}; synthetic CT series of {rows}x{cols}x{depth} "
                f"voxels ({depth} DICOM files each, {gb:.2f} GB as float32) with NIfTI masks, the segmentation "
                f"demo's config (MONAI UNet, patches of its `train.patch_size`, sliding-window evaluation), "
                f"{args.epochs} epoch(s), `train.batch_size={VOLUME_BATCH}` (volumes), `train.num_workers="
                f"{args.workers}`, `train.cache_max_gb={args.volume_cache_gb}`. Each step is a plain call in a fresh process; "
                f"its peak is the memory (PSS) of that process and its children, or the process's own peak resident "
                f"memory (VmHWM) where larger, above {imports / GB:.2f} GB. Slope: b in time ~ volumes^b "
                f"between the two largest counts.\n\n{table}\n"))
    if images and args.write:
        write_section(SECTION, images)
    return 0


def _images_section(args, root: Path, imports: int, train_overrides: list[str], *, command: str, setting: str
                    ) -> str:
    """The 2D rows (steps, training loops, whole runs) and their section's text."""
    from components.data.synthetic import generate_export

    sizes = sorted(args.sizes)
    loops_at = sizes[-1] if args.loops_at is None else args.loops_at
    if loops_at and loops_at not in sizes:
        raise SystemExit(f"--loops-at {loops_at}: not one of --sizes {' '.join(map(str, sizes))}")
    train_overrides = [*train_overrides, f"data.image_size={args.image}"]
    steps, images, training = {}, {}, {}
    for size in sizes:
        folder = root / str(size)
        print(f"{size} images: generating the export", flush=True)
        start = time.perf_counter()
        export = generate_export(folder / "export", n_patients=size // 2, image_size=args.image, seed=1)
        print(f"  generated {export.n_images} images in {time.perf_counter() - start:.0f} s", flush=True)
        images[size] = export.n_images
        overrides = ["data.format=dicom", f"data.source={export.folder}", f"data.labels={export.labels_csv}",
                     "data.name=scale", *train_overrides]
        (folder / "ws").mkdir()
        steps[size] = run_steps(folder / "ws", overrides, after_ingest=lambda: _drop_images(export))
        if size == loops_at:
            manifest = next((folder / "ws" / "data").glob("*/manifest.parquet"))
            training = _in_fresh_process(_child_training, str(manifest), overrides, str(folder / "ws"), args.repeat)
        shutil.rmtree(folder)  # the disk holds one size at a time
    whole = {}
    for size in args.runs:
        print(f"medflow run on {size} images", flush=True)
        whole[size] = run_cli_peak(root / f"run{size}", [f"data.n_patients={size // 2}", "data.seed=1",
                                                         *train_overrides])
        shutil.rmtree(root / f"run{size}")

    table = step_table([images[s] for s in sizes], [steps[s] for s in sizes], imports, "")
    train_table = "\n".join([
        f"| loop ({images[loops_at]:,} images, cache {training['cache']}) | samples/s | medflow / this |",
        "|---|---:|---:|",
        f"| bare MONAI loop, {args.workers} workers | {training['bare']:.1f} | {training['medflow'] / training['bare']:.3f} |",
        f"| bare MONAI loop, no workers | {training['bare, no workers']:.1f} "
        f"| {training['medflow'] / training['bare, no workers']:.3f} |",
        f"| medflow `train_classifier`, {args.workers} workers | {training['medflow']:.1f} | 1.000 |",
        "",
        "medflow against the bare loop with the same workers in the same round, round by round: "
        + ", ".join(f"{r:.3f}" for r in training["rounds"])
        + f" (median {statistics.median(training['rounds']):.3f}).",
    ]) if training else "(no training loop rows: `--loops-at 0`)"
    run_table = "\n".join([
        "| `medflow run` | wall time (s) | peak memory, process tree (PSS, GB) |", "|---|---:|---:|",
        *[f"| {size:,} images | {seconds:.0f} | {peak / GB:.2f} |" for size, (seconds, peak) in whole.items()],
    ]) if whole else "(no whole-run rows: `--runs` names no size)"
    verdicts = [f"medflow's training at {training['medflow'] / training['bare']:.3f} of the bare loop's samples/s "
                f"with the same workers and cache (target 0.98): "
                f"{'met' if training['medflow'] >= 0.98 * training['bare'] else 'not met'}"] if training else []
    if len(whole) > 1:
        (small, (_, low)), (large, (_, high)) = min(whole.items()), max(whole.items())
        verdicts.append(f"`medflow run` on {large:,} images peaks {(high - low) / GB:+.2f} GB against {small:,} "
                        f"(target: within 0.5 GB): {'met' if abs(high - low) <= 0.5 * GB else 'not met'}")
    verdict = "; ".join(verdicts) + "." if verdicts else ""
    print(table, train_table, run_table, verdict, sep="\n\n")
    return (
        f"`{command}` on {date.today().isoformat()}, {setting}; synthetic DICOM exports of {args.image}x"
        f"{args.image} images (two per patient on average), the demo network, {args.epochs} epoch(s), "
        f"`train.num_workers={args.workers}`, `train.cache_max_gb={args.cache_max_gb}`. Each step is a plain "
        f"call in a fresh process; its peak is the memory (PSS) of that process and its children, or the process's "
        f"own peak resident memory (VmHWM) where larger, above "
        f"{imports / GB:.2f} GB (a process that has only imported the steps). Slope: b in time ~ cases^b "
        f"between the two largest sizes.\n\n{table}\n\n{train_table}\n\n{run_table}\n\n"
        + (verdict + "\n\n" if verdict else "") + NOT_MEASURED + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
