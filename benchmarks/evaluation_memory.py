"""Benchmark: the evaluation step's peak memory against the batches it runs: trimming the C heap, and the heap
Arrow allocates on.

One synthetic DICOM export of ``--images`` images at ``--image`` pixels goes through ingest, version, validate and
one training epoch (each a plain call in a fresh process, as in ``scale.py``). Its trained run is then evaluated
(``evaluate_run``: val and test predictions, the bootstrap, the shortcut audit's features, report.json and
report.html) on the manifest replicated ``--factors`` times: each copy's cases and patients renamed, its images the
same files, so the batches and the per-case tables grow with the factor while the export and the model stay the
same. Each evaluation runs in a fresh process, in three ways: as medflow runs it (glibc's free heap pages handed
back after every batch, ``components.training.heap.release_free_memory``, and Arrow's buffers, pandas' strings
and Parquet's, on the C heap, ``components.machine.arrow_on_c_heap``); trimmed with Arrow on pyarrow's default
mimalloc pool (medflow until c125579, 2026-12-05); and neither (the baseline, glibc's and pyarrow's defaults). Peak: the
process's peak resident memory (VmHWM, reset before the evaluation) above its memory when the evaluation starts.
Where the heaps leave freed pages is not the same from run to run, so each evaluation runs ``--repeat`` times,
interleaved; the table gives the medians and the peaks' range.

    .venv/bin/python benchmarks/evaluation_memory.py [--write] [--images 1000] [--image 64] [--factors 1 16]
                                                     [--repeat 3]

Small images and many copies: the per-case tables (the manifest, predictions, groups, features) grow with the
factor, and an image's pixels, which each batch frees again, do not hide them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from report import write_section
from scale import _child_step, _in_fresh_process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Evaluation memory against batches"
MIB = 2**20
# (label, glibc's heap trimmed after every batch, Arrow on the C heap); the first is the baseline, the last medflow
WAYS = (("glibc and pyarrow defaults", False, False), ("trimmed, Arrow on mimalloc", True, False),
        ("trimmed, Arrow on the C heap (medflow)", True, True))
NOTE = (
    'This run, on a9cfbd7 (2026-12-07), is the first since predictions keep glibc\'s heap (a9cfbd7: '
    '`predict_batches` opens the kept heap of `components/training/heap.py` and still trims after every batch; '
    "the defaults' way, without `malloc_trim`, keeps glibc's defaults throughout). Against the run before "
    "(efc3836, 2026-12-06), at 989 and 15,824 images: medflow's median peak 111 and 129 MiB against 111 and 128 "
    "(growth +18 MiB against +16), the defaults' 114 and 162 against 119 and 157, mimalloc's 112 and 147 against "
    '111 and 148. Its times put medflow at 1.131 of the defaults at 16x (1.004 before), but they moved by a '
    'fifth within each way (medflow 48.0-56.6 s, the defaults 46.3-51.3). Straight after, the same evaluation '
    'at 16x with the kept heap and with it switched off (a `sitecustomize` that sets `heap.MALLOPT` to None), '
    'each in a fresh process, three of each alternating: 63.0, 51.4 and 47.4 s against 61.4, 61.7 and 49.6, '
    'peaks 129-133 MiB either way: no cost of its own. On efc3836 the machine ran alone; the run before it '
    "(ddc7d1d, the same day) shared it with the export generation of the 100k scale benchmark (the ways' "
    "medians at 16x 115.4-118.1 s against 49.1-53.0 on efc3836). Against that table, at 989 and 15,824 "
    "images, efc3836 read: medflow's "
    "median peak 111 and 128 MiB against 108 and 133 (growth +16 MiB against +24), the defaults' 119 and "
    "157 against 112 and 157, mimalloc's 111 and 148 against 106 and 153. Since that table the shortcut "
    'audit holds its features once and fits its scaler in passes of 2,048 rows (c8060e6, 4504151; section'
    ' "Evaluation: where its peak grows at 100,000 rows"), which every way shares; the peaks at 1x move '
    'by 5-10 MiB from run to run (the ranges in brackets). Before that, the table of 2026-12-05: medflow '
    '110 and 142 MiB, the defaults 119 and 172.'
    "\n\n"
    "Arrow's pool: pandas' string columns and Parquet's reads and writes allocate in pyarrow's memory "
    'pool, mimalloc by default on Linux, which kept the pages of the buffers Arrow had freed for Arrow '
    'alone (reading a manifest of 15,824 rows left 20 MiB more resident than one of 989, 5 MiB of it in '
    'use). Since 2026-12-05 (c125579, 3ccf9b0) medflow puts them on the C heap, where numpy and pandas '
    'reuse the freed pages, as a step is resolved or a command starts; `ARROW_DEFAULT_MEMORY_POOL`, where'
    ' set, still decides. The scale benchmark with `ARROW_DEFAULT_MEMORY_POOL=mimalloc` (the old default)'
    ' and without it (`python benchmarks/scale.py --sizes 1000 12000 --image 64 --runs --loops-at 0` on '
    'c125579, one run each way, 2026-12-05), at 11,896 images of 64x64, peak above imports on mimalloc '
    'against the C heap (GB): ingest 0.07 and 0.07, version 0.15 and 0.11, validate 0.14 and 0.11, train '
    '0.49 and 0.45, evaluate 0.19 and 0.16, register 0.08 and 0.08, promote 0.12 and 0.08; growth from '
    '989 images: ingest +0.04 and +0.00, validate +0.03 and +0.01, evaluate +0.05 and +0.03, promote '
    "+0.04 and +0.01; the steps' times within the runs' noise (evaluate 65.2 and 63.7 s, ingest 35.5 and "
    '36.3 s; in the 2026-12-05 table, at 16x, 95.5 to 104.9 s on the C heap and 91.5 to 117.3 on '
    'mimalloc). 100,000 images were measured since with every step on the C heap ("Scale: 100,000 '
    'images", above, ddc7d1d on 2026-12-06): every step\'s peak at or below the run before\'s, '
    "evaluation's growth from 1,006 images +0.21 GB against +0.28 (+0.29 on dbfb0e5 later that day, +0.38 "
    'on d3f85d7 on 2026-12-07 with nothing changed on its path: the runs move by that much). An earlier '
    'table (2026-12-05, 1,006 and 4,024 images of '
    '256x256, trimmed or not, Arrow on mimalloc) read 338 and 352 MiB trimmed against 433 and 553 '
    'untrimmed, for 5 % more time.'
)


def _resident(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _child_evaluate(run_id: str, manifest: str, factor: int, trim: bool, c_heap: bool, overrides: list[str],
                    workspace: str) -> tuple[float, int]:
    """Seconds and peak bytes (above the start) of one evaluation on the manifest replicated ``factor`` times."""
    import gc  # noqa: PLC0415

    from flows.cli import quiet_libraries  # noqa: PLC0415

    quiet_libraries()
    import pandas as pd  # noqa: PLC0415
    import pyarrow as pa  # noqa: PLC0415

    from components.config import load_config  # noqa: PLC0415
    from components.inference.evaluate import evaluate_run  # noqa: PLC0415
    from components.machine import arrow_on_c_heap  # noqa: PLC0415
    from components.training import heap  # noqa: PLC0415

    os.chdir(workspace)
    if not trim:
        heap.MALLOC_TRIM = None
    if c_heap:
        arrow_on_c_heap()  # as resolving a step does
    else:
        pa.set_memory_pool(pa.mimalloc_memory_pool())  # before any Arrow buffer: the manifest is read below
    config = load_config(None, overrides=overrides, environ={})
    source = pd.read_parquet(manifest)
    copies = [source.assign(case_id=source["case_id"] + f"-{i}", patient_id=source["patient_id"] + f"-{i}")
              for i in range(factor)]
    path = Path(manifest).with_name(f"manifest-x{factor}.parquet")
    pd.concat(copies, ignore_index=True).to_parquet(path, index=False)
    del source, copies
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the present resident memory
    start_memory, start = _resident("VmRSS"), time.perf_counter()
    evaluate_run(run_id=run_id, manifest_path=path, config=config,
                 out_dir=Path(workspace) / f"eval-x{factor}-{trim}-{c_heap}")
    return time.perf_counter() - start, _resident("VmHWM") - start_memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--images", type=int, default=1000, help="images of the export")
    parser.add_argument("--image", type=int, default=64, help="rows and columns of each image")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 16], help="copies of the manifest evaluated")
    parser.add_argument("--repeat", type=int, default=3, help="evaluations of each factor, trimmed and not")
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("this benchmark reads peak memory from /proc (Linux only)")
    for key in [k for k in os.environ if k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MEDFLOW", "ARROW_"))]:
        del os.environ[key]
    from components.data.synthetic import generate_export

    root = Path(tempfile.mkdtemp(prefix="medflow-bench-evalmem-"))
    try:
        export = generate_export(root / "export", n_patients=args.images // 2, image_size=args.image, seed=1)
        overrides = ["data.format=dicom", f"data.source={export.folder}", f"data.labels={export.labels_csv}",
                     "data.name=evalmem", "train.epochs=1", "train.num_workers=0", f"data.image_size={args.image}"]
        workspace = root / "ws"
        workspace.mkdir()
        chain = {"ingest": lambda o: (), "version": lambda o: (o["ingest"],), "validate": lambda o: (o["version"],),
                 "train": lambda o: (o["version"], o["validate"])}
        outputs: dict = {}
        for name, inputs in chain.items():
            outputs[name] = _in_fresh_process(_child_step, name, inputs(outputs), overrides, str(workspace))[0]
            print(f"  {name}: done", flush=True)
        run_id, manifest = outputs["train"].run_id, str(outputs["version"].manifest)
        runs: dict[tuple[int, str], list[tuple[float, int]]] = {}
        for _ in range(args.repeat):
            for factor in sorted(args.factors):
                for way, trim, c_heap in WAYS:
                    seconds, peak = _in_fresh_process(_child_evaluate, run_id, manifest, factor, trim, c_heap,
                                                      overrides, str(workspace))
                    runs.setdefault((factor, way), []).append((seconds, peak))
                    print(f"  x{factor}, {way}: {seconds:.1f} s, peak {peak / MIB:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = export.n_images
    figures = {key: (statistics.median(s for s, _ in found), statistics.median(p for _, p in found))
               for key, found in runs.items()}

    def peaks(key: tuple[int, str]) -> str:
        least, most = min(p for _, p in runs[key]) / MIB, max(p for _, p in runs[key]) / MIB
        return f"{figures[key][1] / MIB:.0f} ({least:.0f}-{most:.0f})"

    base, medflow = WAYS[0][0], WAYS[-1][0]
    rows = [f"| {n * f:,} images ({f}x) | {way} | {figures[f, way][0]:.1f} "
            f"| {figures[f, way][0] / figures[f, base][0]:.3f} | {peaks((f, way))} |"
            for f in sorted(args.factors) for way, _, _ in WAYS]
    table = "\n".join(["| evaluated | way | s | time against the defaults | peak MiB |", "|---|---|---:|---:|---:|",
                       *rows])
    low, high = min(args.factors), max(args.factors)
    growth = "; ".join(f"{(figures[high, way][1] - figures[low, way][1]) / MIB:+.0f} MiB {way}" for way, _, _ in WAYS)
    summary = (f"Medians of {args.repeat} runs each. Peak from {low}x to {high}x ({(high - low) * n:,} more images): "
               f"{growth}. medflow's median peak against the defaults: "
               + ", ".join(f"{(figures[f, medflow][1] - figures[f, base][1]) / MIB:+.0f} MiB at {f}x"
                           for f in sorted(args.factors)) + ".")
    print(table, summary, sep="\n\n")
    if args.write:
        command = " ".join(["python benchmarks/evaluation_memory.py", *(a for a in sys.argv[1:] if a != "--write")])
        write_section(SECTION, (
            f"`{command}` on {date.today().isoformat()}, {os.cpu_count()} CPU cores, {platform.machine()}, Python "
            f"{platform.python_version()}; one export of {n:,} synthetic {args.image}x{args.image} DICOM images, "
            f"the demo network after one epoch, evaluated (predictions, bootstrap, shortcut features, reports) on "
            f"its manifest replicated {', '.join(f'{f}x' for f in sorted(args.factors))} (the same image files), "
            f"each evaluation in a fresh process in each way, {args.repeat} times interleaved. Peak: VmHWM above the "
            f"process's memory when the evaluation starts; in brackets the range over the runs.\n\n{table}\n\n"
            f"{summary}\n\n{NOTE}\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
