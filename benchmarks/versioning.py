"""Benchmark: medflow's versioning step (``dvc add`` + commit, then ``dvc push`` to a local remote) on datasets of
large files, past the page cache, with DVC's default cache (copies on ext4) and with the cache linked.

Each count of files (random bytes, so nothing compresses or deduplicates; ``--mb`` each, as a full-size CT volume
in float32 is 290 MB) is written into a fresh DVC project and versioned with :func:`version_dataset` and
:func:`push_dataset`, once with the project's ``cache.type`` left at DVC's default (``reflink,copy``: a copy where
the file system has no reflinks) and once with ``hardlink,copy`` (DVC's "large dataset optimization"). The files
are flushed to disk before the calls; disk reads and writes are the kernel's counters (``/proc/vmstat`` pgpgin and
pgpgout) over each call. Slope: b in
time ~ files^b between the two counts; the baseline of each ratio is the default cache on the same files.

    .venv/bin/python benchmarks/versioning.py [--write] [--files 10 50] [--mb 290] [--dir /work/tmp]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from report import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Versioning large files: DVC's cache copied or linked"
NOTE = (
    "With DVC's default cache `dvc add` copies every file into `.dvc/cache`: on ext4, which has no reflinks, a "
    "second copy of the dataset, which past the page cache goes to disk while the add runs. With `hardlink,copy` the "
    "add writes no file data: the dataset's files become the cache's own (read-only hard links), and the dataset is "
    "on disk once besides the remote. The push copies into the remote either way. To set it up in a workspace: `dvc "
    "config cache.type hardlink,copy` (before the first ingest, or `dvc checkout --relink` after). With "
    "`reflink,hardlink,copy`, `dvc add` kept the files copies on ext4 (a link count of 1). medflow never writes "
    "into a dataset folder (ingest "
    "builds a new folder beside it, hard-linking the unchanged files, and renames it into place; "
    "`tests/flows/test_cli_data.py` checks every cached file's md5 after a re-ingest and a checkout in such a "
    "workspace), but anything that writes into a linked file changes the cached version with it, and root, for "
    "whom read-only does not hold, can; so medflow leaves DVC's default. The scale benchmark's CT run (above) "
    "found the version step 9.6 times as long for 5 times the volumes; `dvc add` and push alone, on files of a "
    "volume's size past the page cache, grow about linearly here, so that figure is not DVC's own scaling: there "
    "the step ran right after ingest had written the volumes (not located further)."
)
# hardlink first: with "reflink,hardlink,copy", `dvc add` kept the files copies on ext4 (a link count of 1)
CACHE_TYPES = {"default (reflink,copy)": None, "hardlink,copy": "hardlink,copy"}


def _disk() -> tuple[int, int]:
    """GB read from and written to block devices since boot (the kernel's pgpgin and pgpgout, in KiB)."""
    counters = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return int(counters["pgpgin"]), int(counters["pgpgout"])


def _measure(root: Path, n_files: int, mb: int, cache_type: str | None) -> dict:
    import numpy as np

    from components.data.versioning import ensure_repository, push_dataset, version_dataset

    data = root / "data" / "ct"
    rng = np.random.default_rng(0)
    for i in range(n_files):
        (data / f"case{i:03d}").mkdir(parents=True)
        words = rng.integers(0, 2 ** 31, size=mb * 2 ** 20 // 4, dtype=np.int32)
        (data / f"case{i:03d}" / "image.nii").write_bytes(words.tobytes())
    os.sync()  # the generated files' dirty pages are written now, not during the calls measured
    ensure_repository(root)
    if cache_type:
        subprocess.run([str(Path(sys.executable).with_name("dvc")), "config", "cache.type", cache_type], cwd=root,
                       check=True)
    figures = {}
    for step, call in (("add", lambda: version_dataset(root, data, remote=str(root / "remote"))),
                       ("push", lambda: push_dataset(root, figures["version"].dvc_file))):
        read, written = _disk()
        start = time.perf_counter()
        result = call()
        figures[step] = time.perf_counter() - start
        after = _disk()
        figures[f"{step}_read"] = (after[0] - read) / 2 ** 20
        figures[f"{step}_written"] = (after[1] - written) / 2 ** 20
        if step == "add":
            figures["version"] = result
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--files", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--mb", type=int, default=290)
    parser.add_argument("--dir", type=Path, default=None, help="where the projects go (default: the temp folder)")
    args = parser.parse_args()

    rows = []
    for n_files in args.files:
        for label, cache_type in CACHE_TYPES.items():
            root = Path(tempfile.mkdtemp(prefix="medflow-versioning-", dir=args.dir))
            try:
                figures = _measure(root, n_files, args.mb, cache_type)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            rows.append((n_files, label, figures))
            print(f"{n_files} files, {label}: add {figures['add']:.1f} s, push {figures['push']:.1f} s", flush=True)
    baseline = {n: f["add"] + f["push"] for n, label, f in rows if label.startswith("default")}
    total = {(n, label): f["add"] + f["push"] for n, label, f in rows}
    lines = [
        "| files | GB | cache | `dvc add` + commit (s) | read / written (GB) | push (s) | read / written (GB) "
        "| total (s) | default / this |",
        "|---:|---:|---|---:|---|---:|---|---:|---:|",
        *[f"| {n} | {n * args.mb / 1024:.1f} | {label} | {f['add']:.1f} | {f['add_read']:.1f} / {f['add_written']:.1f} "
          f"| {f['push']:.1f} | {f['push_read']:.1f} / {f['push_written']:.1f} | {f['add'] + f['push']:.1f} "
          f"| {baseline[n] / (f['add'] + f['push']):.2f}x |" for n, label, f in rows],
    ]
    table = "\n".join(lines)
    slopes = ""
    if len(args.files) >= 2:
        small, large = sorted(args.files)[-2:]
        slope = {label: math.log(total[large, label] / total[small, label]) / math.log(large / small)
                 for label in CACHE_TYPES}
        slopes = "; ".join(f"{label}: {b:.2f}" for label, b in slope.items())
        slopes = f"Slope of the total from {small} to {large} files: {slopes}."
    print(table)
    print(slopes)
    if args.write:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        write_section(SECTION, (
            f"`python benchmarks/versioning.py --files {' '.join(map(str, args.files))} --mb {args.mb}` on "
            f"{date.today().isoformat()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB of memory, "
            f"{platform.machine()}, Python {platform.python_version()}; each count of files of random bytes written "
            f"into a fresh DVC project, flushed to disk, and versioned as the ingest step versions a dataset "
            f"(`dvc add` of the folder and the git commit of its `.dvc` file, then `dvc push` to a local remote); disk "
            f"figures are the kernel's block-device counters over each call.\n\n{table}\n\n{slopes} {NOTE}\n"
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
