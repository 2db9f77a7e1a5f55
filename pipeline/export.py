"""ONNX export of a distilled student (preprocessing inside the graph) and its parity gate against torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.distill import Distiller
from pipeline.errors import InputError, ParityError
from pipeline.probe import Probe, pool

PRODUCER = "logitfree-kd"


class Deployable(nn.Module):
    """uint8 NHWC images -> logits: scaling, per-channel normalisation, student and chosen head in one graph."""

    def __init__(self, distiller: Distiller, mean: list[float], std: list[float], probe: Probe | None = None):
        super().__init__()
        self.distiller = distiller
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.probe = None
        if probe is not None:
            self.probe = nn.Linear(probe.weight.shape[0], probe.weight.shape[1])
            scale = 1 / probe.std  # fold the feature standardisation into the linear layer
            with torch.no_grad():
                self.probe.weight.copy_((probe.weight * scale[:, None]).T.float())
                self.probe.bias.copy_((probe.bias - (probe.mean * scale) @ probe.weight).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        if self.probe is None:
            return self.distiller(x)
        layer = self.distiller.student_layers[-1]
        return self.probe(pool(self.distiller.view.collect(x, [layer])[0]))


def export_onnx(model: Deployable, path: Path, image_shape: tuple[int, int, int], opset: int,
                metadata: dict[str, str]) -> None:
    """Write a self-contained ONNX file with a dynamic batch axis and our metadata."""
    import onnx

    model.eval()
    example = torch.zeros(2, *image_shape, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                output_names=["logits"], dynamic_shapes={"images": {0: batch}},
                                external_data=False, verbose=False)
    proto = program.model_proto
    for key, value in {"producer": PRODUCER, **metadata}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))


@torch.no_grad()
def torch_logits(model: Deployable, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))).numpy()
                           for s in range(0, len(images), batch_size)])


def parity_gate(path: Path, reference: np.ndarray, images: np.ndarray, batch_size: int, atol: float,
                min_agreement: float) -> dict:
    """onnx full check, then onnxruntime logits in batches of `batch_size` vs the torch `reference` logits.

    Raises ParityError if the gate fails.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(["logits"], {"images": np.ascontiguousarray(images[s:s + batch_size])})[0]
                          for s in range(0, len(images), batch_size)])
    want = reference[:len(images)]
    worst = float(np.abs(got - want).max())
    result = {"max_abs_diff": worst, "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
              "images": len(images)}
    if not worst <= atol or result["top1_agreement"] < min_agreement:  # NaN logits fail too
        raise ParityError(f"ONNX parity gate failed at batch size {batch_size}: max |logit diff| {worst:.3g} "
                          f"(limit {atol:g}), top-1 agreement {result['top1_agreement']:.4%} "
                          f"(limit {min_agreement:.2%})")
    return result


def read_metadata(path: str | Path) -> dict:
    """Our metadata from an ONNX file; refuses files that are not ONNX or not made by this pipeline."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and friends
        raise InputError(f"{path} is not an ONNX model: {type(err).__name__}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("producer") != PRODUCER:
        raise InputError(f"{path} was not exported by this pipeline (no {PRODUCER} metadata)")
    try:
        classes, image_shape = json.loads(meta["classes"]), json.loads(meta["image_shape"])
    except (KeyError, ValueError) as err:
        raise InputError(f"{path}: damaged metadata ({type(err).__name__}: {err})") from None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise InputError(f"{path}: damaged metadata (classes {meta['classes']})")
    if not (isinstance(image_shape, list) and len(image_shape) == 3
            and all(isinstance(n, int) and n > 0 for n in image_shape)):
        raise InputError(f"{path}: damaged metadata (image_shape {meta['image_shape']}, not [H, W, C])")
    _check_graph(proto.graph, path, image_shape, len(classes))
    return {**meta, "classes": classes, "image_shape": image_shape}


def _check_graph(graph, path, image_shape: list[int], classes: int) -> None:
    """The graph takes `images` (N, H, W, C) and gives `logits` (N, classes), as the metadata says."""
    def dims(values, name: str) -> list[int] | None:  # 0 for a dynamic axis
        found = [v for v in values if v.name == name]
        return [d.dim_value for d in found[0].type.tensor_type.shape.dim] if found else None

    images, logits = dims(graph.input, "images"), dims(graph.output, "logits")
    if images is None or logits is None:
        raise InputError(f"{path}: the graph has no 'images' input or 'logits' output")
    if len(images) != 4 or any(d not in (0, want) for d, want in zip(images[1:], image_shape)):
        raise InputError(f"{path}: the graph's input is {images}, its metadata says images of {image_shape}")
    if len(logits) != 2 or logits[1] not in (0, classes):
        raise InputError(f"{path}: the graph gives logits {logits}, its metadata names {classes} classes")


def gate_images(images: np.ndarray, batch_sizes: list[int], small_batch_images: int) -> dict[int, np.ndarray]:
    """Every test image at the largest batch size; the first `small_batch_images` at the others.

    A graph that mishandles some batch size does so on any image; small batches only make the check slower (all
    10k Fashion-MNIST test images at batch size 7 took longer than at 256 and than the export itself).
    """
    largest = max(batch_sizes)
    return {bs: images if bs == largest else images[:small_batch_images] for bs in batch_sizes}


def check_export_folder(out_path: Path, metrics: Path) -> None:
    """The ONNX file's folder is the export stage's own (its manifest goes there): refuse one holding other files,
    e.g. `--out metrics/model.onnx`, whose manifest would claim the folder for the export stage."""
    folder = out_path.parent
    own = {p.resolve() for p in (out_path, metrics, folder / "manifest.json")}
    others = sorted(p.name for p in folder.iterdir() if p.resolve() not in own
                    and not p.name.startswith(".")) if folder.is_dir() else []
    if others:
        raise InputError(f"output folder {folder} holds other files ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}): export into a folder of its own")


def export_student(run_dir: Path, probe_dir: Path | None, data, out_path: Path, opset: int, batch_sizes: list[int],
                   small_batch_images: int, atol: float, min_agreement: float) -> tuple[dict, dict[str, str], str]:
    """Export, check and only then move the ONNX file into place; returns the parity figures, the ids of the
    student (and probe) exported and the file's digest."""
    from pipeline.io import atomic_path, file_digest, manifest_id, read_manifest
    from pipeline.probe import load_probe
    from pipeline.student import load_student_dir

    distiller, spec, student_id = load_student_dir(run_dir, data)
    made_from = {"student": student_id}
    probe = None
    if probe_dir:
        probe = load_probe(probe_dir, read_manifest(run_dir, "student"))
        made_from["probe"] = manifest_id(read_manifest(probe_dir, "probe"))
    model = Deployable(distiller, data.meta["mean"], data.meta["std"], probe).eval()
    metadata = {"classes": json.dumps(data.meta["classes"]), "image_shape": json.dumps(data.meta["image_shape"]),
                "input": "uint8 NHWC images; scaling and normalisation are inside the graph",
                "method": distiller.method, "arch": spec.arch, "head": "probe" if probe else "student",
                "run": run_dir.name, **({"resize_mode": data.resize_mode} if data.resize_mode else {})}
    reference = torch_logits(model, data.test_images)
    figures = {}
    with atomic_path(out_path) as tmp:
        export_onnx(model, tmp, tuple(data.meta["image_shape"]), opset, metadata)
        for bs, images in gate_images(data.test_images, batch_sizes, small_batch_images).items():
            figures[bs] = parity_gate(tmp, reference, images, bs, atol, min_agreement)
        digest = file_digest(tmp)  # (a stage's output is put in place when the stage ends)
    return {"max_abs_diff": max(f["max_abs_diff"] for f in figures.values()),
            "top1_agreement": min(f["top1_agreement"] for f in figures.values()),
            "by_batch_size": {str(bs): f for bs, f in figures.items()},
            **{k: v for k, v in metadata.items() if k in ("method", "arch", "head", "run")}}, made_from, digest
