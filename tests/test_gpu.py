"""The CUDA paths of compute_embeddings; skipped where no GPU is present.

CI machines have no GPU, so these run only on a machine with one (the
device tool's lent GPU, or a user's workstation): ``make test`` there runs
them with everything else.
"""

import numpy as np
import pytest
import torch

import dinoprop.embeddings as de
from dinoprop.models import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _vectors(dataset, field):
    return np.stack(dataset.values(field)).astype(np.float64)


def test_cuda_defaults_to_reduced_precision_and_matches_cpu(image_dataset, tiny_dinov2_dir):
    model = load_model(tiny_dinov2_dir)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert model.device.type == "cuda" and model.dtype == expected
    assert next(model.module.parameters()).dtype == expected
    assert model.default_batch_size() >= 128

    de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, device="cpu",
                          precision="fp32", embeddings_field="cpu", num_workers=0)
    results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir,
                                    embeddings_field="gpu", num_workers=2)
    assert results.device.startswith("cuda") and results.num_embedded == len(image_dataset)
    cosines = (_vectors(image_dataset, "cpu") * _vectors(image_dataset, "gpu")).sum(1)
    assert cosines.min() > 0.98


def test_gpu_jpeg_decoding_matches_cpu_decoding(image_dataset, tiny_dinov2_dir):
    de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, precision="fp32",
                          embeddings_field="cpu_decoded", num_workers=0)
    results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, precision="fp32",
                                    embeddings_field="gpu_decoded", gpu_decode=True)
    assert results.num_embedded == len(image_dataset) and results.num_failed == 0
    cosines = (_vectors(image_dataset, "cpu_decoded") * _vectors(image_dataset, "gpu_decoded")).sum(1)
    assert cosines.min() > 0.99


def test_compiled_model_gives_the_same_vectors(image_dataset, tiny_dinov2_dir):
    de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, precision="fp32",
                          embeddings_field="eager", num_workers=0)
    de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, precision="fp32",
                          embeddings_field="compiled", compile=True, num_workers=0)
    cosines = (_vectors(image_dataset, "eager") * _vectors(image_dataset, "compiled")).sum(1)
    assert cosines.min() > 0.999


def test_patches_embed_on_the_gpu(image_dataset, tiny_dinov2_dir):
    import fiftyone as fo

    for sample in image_dataset.limit(3):
        sample["boxes"] = fo.Detections(detections=[
            fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.5, 0.5]),
            fo.Detection(label="b", bounding_box=[0.9, 0.9, 0.01, 0.01]),  # tiny
        ])
        sample.save()
    results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir,
                                    patches_field="boxes", embeddings_field="embedding")
    assert (results.num_embedded, results.num_failed) == (6, 0)
    assert image_dataset.count("boxes.detections.embedding") == 6


def test_flip_average_on_the_gpu_matches_cpu(image_dataset, tiny_dinov2_dir):
    de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, device="cpu", precision="fp32",
                          embeddings_field="cpu_flip", flip_average=True, num_workers=0)
    results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, precision="fp32",
                                    embeddings_field="gpu_flip", flip_average=True,
                                    gpu_decode=True)
    assert results.flip_average and results.num_embedded == len(image_dataset)
    cosines = (_vectors(image_dataset, "cpu_flip") * _vectors(image_dataset, "gpu_flip")).sum(1)
    assert cosines.min() > 0.99
