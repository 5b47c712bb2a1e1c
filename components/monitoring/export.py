"""``medflow export``: a registered classifier as one ONNX graph, checked against its pyfunc.

The graph takes raw images ``images`` (N, H, W) float32 at one input size (the training size unless told) and
returns ``probabilities`` (N, K): the served pyfunc's preprocessing (area resize to the training size, the
training intensity normalisation, or a pretrained backbone's [0, 1] scaling and channel statistics), the
network, the fitted temperature and softmax (sigmoid per label for a multi-label model). torch's dynamo
exporter writes it (ONNX opset 18); onnxruntime runs it for the check.

The check predicts the model's own test split (the cases of that size, when this workspace holds the model's
data version; otherwise images drawn from the training intensity distribution, and says so) with both the
pyfunc and onnxruntime and reports the largest absolute difference. The file is then logged to the version's
run under ``onnx/`` and the version is tagged with where it is and that difference.

Segmentation networks are not exported: the pyfunc runs them by sliding window over any volume, which is a
loop outside the network that ONNX cannot hold.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from mlflow.tracking import MlflowClient

from components import paths
from components.errors import PredictError
from components.monitoring.drift import data_manifest
from components.monitoring.predict import ModelRef, resolve_model
from components.training.preprocess import PreprocessSpec, read_nifti

FORMATS = ("onnx",)
TOLERANCE = 1e-4  # float32 graphs of the same network differ by rounding only
N_RANDOM = 16


@dataclass(frozen=True)
class ExportResult:
    path: Path
    model: ModelRef
    input_size: tuple[int, int]
    max_abs_diff: float
    n_checked: int
    checked_on: str
    artifact_uri: str


class ServedClassifier(torch.nn.Module):
    """The pyfunc's path from raw images to probabilities as one traceable module.

    MONAI's transforms work on one image at a time in Python, which an exporter cannot follow, so the same
    steps are written here in torch ops; the export's check compares the result with the pyfunc itself.
    """

    def __init__(self, network: torch.nn.Module, spec: PreprocessSpec, *, temperature: float, multilabel: bool):
        super().__init__()
        self.network, self.size = network, tuple(spec.spatial_size)
        self.temperature, self.multilabel = float(temperature), multilabel
        self.channels, self.mean, self.std = spec.channels, float(spec.mean), float(spec.std)
        per_channel = spec.channel_mean is not None
        self.register_buffer("channel_mean", torch.tensor(spec.channel_mean or (0.0,)).view(1, -1, 1, 1))
        self.register_buffer("channel_std", torch.tensor(spec.channel_std or (1.0,)).view(1, -1, 1, 1))
        self.per_channel = per_channel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images[:, None], size=self.size, mode="area")  # MONAI Resize's default mode
        if self.per_channel:  # ScaleIntensity(0, 1) per image, RepeatChannel, NormalizeIntensity per channel
            low = x.amin(dim=(1, 2, 3), keepdim=True)
            span = x.amax(dim=(1, 2, 3), keepdim=True) - low
            x = torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))
            x = (x.repeat(1, self.channels, 1, 1) - self.channel_mean) / self.channel_std
        else:
            x = (x - self.mean) / self.std
        logits = self.network(x) / self.temperature
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


def _check_images(model: ModelRef, spec: PreprocessSpec, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    manifest = data_manifest(model.dataset, model.data_version)
    if manifest is not None:
        root = paths.data_root() / model.dataset
        test = manifest[manifest["split"] == "test"] if "split" in manifest.columns else manifest
        read = lambda image: np.squeeze(image.get_fdata(dtype=np.float32))  # noqa: E731
        images = [read_nifti(root / p, read) for p in test["image"]]  # a file that fails: one line naming it
        images = [a for a in images if a.shape == size]
        if images:
            return np.stack(images), f"{len(images)} test images of {model.dataset}@{model.data_version[:12]}"
    rng = np.random.default_rng(0)
    images = rng.normal(spec.mean, spec.std, size=(N_RANDOM, *size)).astype(np.float32)
    why = ("this workspace does not hold its data version" if manifest is None
           else f"its test split has no image of {size[0]}x{size[1]}")
    return images, f"{N_RANDOM} images drawn from the training intensity distribution ({why})"


def export_model(reference: str, out: Path, *, fmt: str = "onnx", input_size: tuple[int, int] | None = None) -> ExportResult:
    """Export the registered version ``reference`` to ``out``, check it against the pyfunc, log it to the version.

    Raises:
        RegistryError: an unknown model, alias or version.
        PredictError: another format, a segmentation model, an input size below the smallest the model reads,
            a network the exporter cannot follow, or a graph whose predictions differ from the pyfunc's.
    """
    import onnxruntime  # noqa: PLC0415 (export only)

    if fmt not in FORMATS:
        raise PredictError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    model = resolve_model(reference)
    if model.task == "segmentation":
        raise PredictError(f"{model.name} version {model.version} is a segmentation model: ONNX export covers "
                           "classifiers (the pyfunc's sliding window is a loop outside the network)")
    served = mlflow.pyfunc.load_model(model.uri)
    python_model = served.unwrap_python_model()
    python_model.use_device("cpu")  # torch.onnx traces on the CPU, and the check compares the pyfunc there
    spec = python_model.spec
    size = tuple(input_size or spec.spatial_size)
    if min(size) < min(16, *spec.spatial_size):
        raise PredictError(f"--input-size {size[0]} {size[1]} is smaller than the model reads (trained on "
                           f"{spec.spatial_size[0]}x{spec.spatial_size[1]})")
    module = ServedClassifier(python_model.model, spec, temperature=python_model.temperature,
                              multilabel=python_model.multilabel).eval()
    images, checked_on = _check_images(model, spec, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        try:
            torch.onnx.export(module, (torch.from_numpy(images[:2]),), str(staged), dynamo=True, external_data=False,
                              input_names=["images"], output_names=["probabilities"],
                              dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False)
        except Exception as exc:  # noqa: BLE001 (torch.export raises many kinds; one line names the network)
            raise PredictError(f"torch could not export {model.name} version {model.version} to ONNX: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
        session = onnxruntime.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        exported = session.run(["probabilities"], {"images": images})[0]
        expected = np.asarray(served.predict(images))
        diff = float(np.abs(exported - expected).max())
        if not diff <= TOLERANCE:
            raise PredictError(f"the ONNX graph of {model.name} version {model.version} differs from its pyfunc by "
                               f"{diff:.3g} (more than {TOLERANCE:g}) on {checked_on}: nothing was exported")
        meta = {"model": model.name, "version": model.version, "data_version": model.data_version,
                "input": f"images (N, {size[0]}, {size[1]}) float32, raw intensities",
                "output": "probabilities (N, K) calibrated", "max_abs_diff": diff, "checked_on": checked_on}
        (Path(tmp) / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
        client = MlflowClient(paths.tracking_uri())
        client.log_artifact(model.run_id, str(staged), artifact_path="onnx")
        client.log_artifact(model.run_id, str(Path(tmp) / "export.json"), artifact_path="onnx")
        staged.replace(out)
    artifact_uri = f"runs:/{model.run_id}/onnx/{out.name}"
    client.set_model_version_tag(model.name, model.version, "medflow.onnx", artifact_uri)
    client.set_model_version_tag(model.name, model.version, "medflow.onnx.max_abs_diff", f"{diff:.3g}")
    return ExportResult(path=out, model=model, input_size=size, max_abs_diff=diff, n_checked=len(images),
                        checked_on=checked_on, artifact_uri=artifact_uri)
