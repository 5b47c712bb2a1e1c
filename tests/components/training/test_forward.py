"""The forward passes: the batch loop every stage predicts with (which hands the C heap's free pages back after
each batch, or in training's validation once it has grown the process past a limit), and features of a frozen
encoder."""

from __future__ import annotations

import numpy as np
import torch

from components.training import forward, heap


def test_predict_batches_keeps_the_heap_trims_it_after_every_batch_and_predicts_as_the_model_does(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: calls.append(("trim", pad)))
    monkeypatch.setattr(heap, "MALLOPT", lambda option, value: calls.append((option, value)))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    images = torch.randn(10, 4)
    loader = [{"image": images[i:i + 4]} for i in range(0, 10, 4)]  # batches of 4, 4 and 2
    logits, labels = forward.predict_batches(model, loader, torch.device("cpu"))
    # glibc keeps the blocks on its heap from before the first batch; a trim after each batch, and one as it ends
    assert calls == [(heap.M_MMAP_THRESHOLD, 32 * 2**20), (heap.M_TRIM_THRESHOLD, -1), *[("trim", 0)] * 3,
                     (heap.M_TRIM_THRESHOLD, 64 * 2**20), ("trim", 0)]
    assert labels is None
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(images).numpy(), rtol=1e-6)


def test_predict_batches_with_a_limit_trims_only_past_it(monkeypatch):
    trims, free = [], iter([10, 300 * 2**20, 10])  # what glibc says it holds free after each of three batches
    resident = iter([1000 * 2**20, 1300 * 2**20, 1000 * 2**20])  # as the loop begins, after batch 2, its trim
    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(heap, "free_heap_bytes", lambda: next(free))
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(resident))
    logits, _ = forward.predict_batches(torch.nn.Linear(4, 3), [{"image": torch.randn(2, 4)}] * 3,
                                        torch.device("cpu"), trim_above=heap.VALIDATION_FREE_HEAP)
    assert trims == [0, 0] and logits.shape == (6, 3)  # past the limit after batch 2; as the kept heap closes


def test_network_input_is_a_plain_tensor_on_the_device_without_a_copy():
    from monai.data import MetaTensor

    batch = MetaTensor(torch.randn(2, 1, 4, 4), meta={"filename_or_obj": "a.nii.gz"})
    plain = forward.network_input(batch, torch.device("cpu"))
    assert type(plain) is torch.Tensor
    assert plain.data_ptr() == batch.data_ptr()
    assert torch.equal(plain, batch.as_tensor())


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
