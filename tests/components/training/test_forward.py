"""The batch loop every stage predicts with hands the C heap's free pages back: after each batch, or in training's
validation once it has grown the process past a limit."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from components.training import forward

REPO = Path(__file__).resolve().parents[3]


def test_predict_batches_trims_the_heap_after_every_batch_and_predicts_as_the_model_does(monkeypatch):
    trims = []
    monkeypatch.setattr(forward, "MALLOC_TRIM", lambda pad: trims.append(pad))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    images = torch.randn(10, 4)
    loader = [{"image": images[i:i + 4]} for i in range(0, 10, 4)]  # batches of 4, 4 and 2
    logits, labels = forward.predict_batches(model, loader, torch.device("cpu"))
    assert trims == [0, 0, 0]
    assert labels is None
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(images).numpy(), rtol=1e-6)


def test_predict_batches_with_a_limit_trims_only_past_it(monkeypatch):
    trims, free = [], iter([10, 300 * 2**20, 10])  # what glibc says it holds free after each of three batches
    resident = iter([1000 * 2**20, 1300 * 2**20, 1000 * 2**20])  # as the loop begins, after batch 2, its trim
    monkeypatch.setattr(forward, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(forward, "free_heap_bytes", lambda: next(free))
    monkeypatch.setattr(forward, "resident_bytes", lambda: next(resident))
    logits, _ = forward.predict_batches(torch.nn.Linear(4, 3), [{"image": torch.randn(2, 4)}] * 3,
                                        torch.device("cpu"), trim_above=forward.VALIDATION_FREE_HEAP)
    assert trims == [0] and logits.shape == (6, 3)


def test_a_trimmer_trims_once_the_loop_has_grown_the_process_past_its_limit_and_again_once_grown_by_it(
        monkeypatch):
    trims, mib = [], 2**20
    # what the process holds resident: as the loop begins, then after each batch (and straight after each trim)
    resident = iter([1000 * mib, 1100 * mib, 1300 * mib, 950 * mib, 980 * mib, 930 * mib, 1190 * mib, 900 * mib])
    monkeypatch.setattr(forward, "MALLOC_TRIM", lambda pad: trims.append(len(batches)))
    monkeypatch.setattr(forward, "free_heap_bytes", lambda: 527 * mib)  # glibc's count: trimmed chunks count too
    monkeypatch.setattr(forward, "resident_bytes", lambda: next(resident))
    trim, batches = forward.HeapTrimmer(256 * mib), []
    for batch in range(5):
        batches.append(batch)
        trim()
    # +100 MiB since the loop began is not past the limit, +300 is; then +30 is not; from the least since (930,
    # not 950) +260 is
    assert trims == [2, 5]
    assert next(resident, None) is None


def test_a_trimmer_leaves_the_free_pages_the_loop_began_with(monkeypatch):
    """A validation begins with the training steps' freed activations in the heap: the next epoch takes them
    again, and trimming them only made it fault them back in."""
    trims, mib = [], 2**20
    resident = iter([1500 * mib, 1500 * mib, 1510 * mib, 1600 * mib])
    monkeypatch.setattr(forward, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(forward, "free_heap_bytes", lambda: 640 * mib)
    monkeypatch.setattr(forward, "resident_bytes", lambda: next(resident))
    trim = forward.HeapTrimmer(256 * mib)
    for _ in range(3):
        trim()
    assert trims == []


def test_a_trimmer_under_its_limit_of_free_heap_never_trims(monkeypatch):
    trims = []
    monkeypatch.setattr(forward, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(forward, "free_heap_bytes", lambda: 10 * 2**20)
    trim = forward.HeapTrimmer(256 * 2**20)
    for _ in range(3):
        trim()
    assert trims == []


def test_where_glibc_cannot_say_what_is_free_a_limit_trims_every_time(monkeypatch):
    trims = []
    monkeypatch.setattr(forward, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(forward, "MALLINFO2", None)  # glibc before 2.33
    assert forward.free_heap_bytes() is None
    forward.release_free_memory(above=forward.VALIDATION_FREE_HEAP)
    assert trims == [0]


def test_network_input_is_a_plain_tensor_on_the_device_without_a_copy():
    from monai.data import MetaTensor

    batch = MetaTensor(torch.randn(2, 1, 4, 4), meta={"filename_or_obj": "a.nii.gz"})
    plain = forward.network_input(batch, torch.device("cpu"))
    assert type(plain) is torch.Tensor
    assert plain.data_ptr() == batch.data_ptr()
    assert torch.equal(plain, batch.as_tensor())


def test_without_malloc_trim_in_the_c_library_release_does_nothing(monkeypatch):
    monkeypatch.setattr(forward.ctypes, "CDLL", lambda name: types.SimpleNamespace())  # macOS, musl: no malloc_trim
    assert forward._libc_function("malloc_trim") is None and forward._mallinfo2() is None
    assert forward._libc_function("mallopt") is None
    monkeypatch.setattr(forward, "MALLOC_TRIM", None)
    monkeypatch.setattr(forward, "MALLOPT", None)
    forward.release_free_memory()
    with forward.kept_heap():
        pass


@pytest.mark.parametrize("fails", [False, True])
def test_a_kept_heap_sets_glibcs_thresholds_and_sets_them_back_and_trims_as_it_closes(monkeypatch, fails):
    calls = []
    monkeypatch.setattr(forward, "MALLOPT", lambda option, value: calls.append((option, value)))
    monkeypatch.setattr(forward, "MALLOC_TRIM", lambda pad: calls.append(("trim", pad)))
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext(), forward.kept_heap():
        assert calls == [(forward.M_MMAP_THRESHOLD, 32 * 2**20), (forward.M_TRIM_THRESHOLD, -1)]
        if fails:
            raise RuntimeError("a failed step")
    assert calls[2:] == [(forward.M_TRIM_THRESHOLD, 64 * 2**20), ("trim", 0)]


KEPT_HEAP = """
import contextlib
import resource
import sys
import numpy as np
from components.training.forward import kept_heap

def faults(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):  # a step's working set, allocated and freed
        blocks = [np.ones(2**20 // 8) for _ in range(128)]  # 128 MiB in blocks of 1 MiB
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with kept_heap() if sys.argv[1] == "kept" else contextlib.nullcontext():
    faults(1)  # the heap grows to hold them once
    print(faults(4))
"""


@pytest.mark.skipif(forward.MALLOPT is None, reason="the C library has no mallopt (not glibc)")
def test_a_kept_heap_keeps_the_pages_a_step_freed_for_the_next_step():
    """With glibc's defaults, freeing a step's 128 MiB trims the heap's top and the next step faults its 32,768
    pages in again (in a fresh process: no other test's settings or heap in the figures)."""
    faults = {how: int(subprocess.run([sys.executable, "-c", KEPT_HEAP, how], capture_output=True, text=True,
                                      check=True, cwd=REPO).stdout.split()[-1]) for how in ("default", "kept")}
    assert faults["default"] > 3 * 32_768, faults  # glibc's defaults: four steps fault their pages in again
    assert faults["kept"] < 1_000, faults


FRAGMENTED_HEAP = """
import ctypes
import sys
from components.training.forward import free_heap_bytes, release_free_memory

def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 * 1024) for _ in range(2000)]  # 125 MiB below the mmap threshold: on the heap
for block in blocks:
    ctypes.memset(block, 1, 64 * 1024)
pin = libc.malloc(96 * 1024)  # from the heap's top, above them: freeing them cannot shrink the heap from its top
for block in blocks:
    libc.free(block)
before, counted = resident(), free_heap_bytes()
release_free_memory(above=int(sys.argv[1]))
print(before - resident(), counted, free_heap_bytes())
"""


def _released(above: int) -> int:
    """Bytes :func:`release_free_memory` hands back after 125 MiB were freed below a pinned block, in a fresh
    process (no other test's heap in the figures)."""
    return _fragmented_heap(above)[0]


def _fragmented_heap(above: int) -> list[int | None]:
    """That run's bytes handed back, and glibc's count of free bytes before and after it (None without mallinfo2)."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP, str(above)], capture_output=True, text=True,
                         check=True, cwd=REPO)  # the repository on the path wherever pytest was started
    return [None if x == "None" else int(x) for x in out.stdout.split()[-3:]]


@pytest.mark.skipif(forward.MALLOC_TRIM is None, reason="the C library has no malloc_trim (not glibc)")
def test_release_free_memory_hands_freed_heap_pages_back_to_the_system():
    released = _released(0)
    assert released > 100 * 2**20, f"only {released / 2**20:.0f} MiB of 125 MiB freed went back to the system"


@pytest.mark.skipif(forward.MALLINFO2 is None, reason="the C library has no mallinfo2 (not glibc 2.33+)")
def test_release_free_memory_past_a_limit_counts_what_glibc_holds_free():
    assert _released(200 * 2**20) < 20 * 2**20  # 125 MiB free is under a 200 MiB limit: kept
    assert _released(50 * 2**20) > 100 * 2**20  # and over a 50 MiB one: handed back


@pytest.mark.skipif(forward.MALLINFO2 is None, reason="the C library has no mallinfo2 (not glibc 2.33+)")
def test_glibc_counts_the_pages_a_trim_handed_back_as_free_still():
    """Why :class:`~components.training.forward.HeapTrimmer` asks the process's size too: after ``malloc_trim``
    the 125 MiB freed below a pinned block are counted free as before (their pages went back to the system)."""
    released, before, after = _fragmented_heap(0)
    assert released > 100 * 2**20 and before > 120 * 2**20 and after > 0.95 * before


def test_features_come_from_the_encoder_in_autos_layout_and_equal_a_contiguous_pass(tmp_path):
    import nibabel as nib  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    from components.training.models import build_classifier  # noqa: PLC0415
    from components.training.preprocess import PreprocessSpec, training_transforms  # noqa: PLC0415

    rng = np.random.default_rng(0)
    for i in range(5):
        nib.save(nib.Nifti1Image(rng.normal(100, 30, (40, 40)).astype(np.float32), np.eye(4)), tmp_path / f"{i}.nii.gz")
    frame = pd.DataFrame({"image": [f"{i}.nii.gz" for i in range(5)]})
    spec = PreprocessSpec(spatial_size=(32, 32), mean=100.0, std=30.0)
    torch.manual_seed(0)
    encoder = build_classifier("densenet", spatial_dims=2, in_channels=1, num_classes=2,
                               kwargs={"init_features": 16, "growth_rate": 16, "block_config": [2, 4, 4]}).eval()
    transform = training_transforms(spec, augment=False)
    images = torch.stack([transform({"image": str(tmp_path / p)})["image"] for p in frame["image"]])
    with torch.no_grad():
        contiguous = encoder(images).numpy()
    features = forward.extract_features(encoder, spec, frame, tmp_path, torch.device("cpu"), batch_size=2)
    # a weight of one input channel or a 1x1 kernel has the same bytes in either layout
    weight = next(p for p in encoder.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    np.testing.assert_allclose(features, contiguous, rtol=1e-4, atol=1e-5)  # another layout rounds differently

    vit = build_classifier("vit", spatial_dims=2, in_channels=1, num_classes=2,
                           kwargs={"img_size": 32, "patch_size": 8, "hidden_size": 48, "mlp_dim": 96,
                                   "num_layers": 1, "num_heads": 2}).eval()
    forward.extract_features(vit, spec, frame, tmp_path, torch.device("cpu"))
    assert all(p.is_contiguous() for p in vit.parameters())  # a ViT's weights are linear layers: left as they are
