"""Real-world image files: EXIF orientation, bit depth, size limits.

Each is checked on every decode path: whole images on the CPU, object
patches, and the GPU decode path's logic (run on the CPU).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinoprop.embeddings as de
from dinoprop.models import Preprocessing, load_model, open_image, preprocess_image

FIELD = "dinoprop_embedding"
DEMO_PHOTO = next(
    (Path(__file__).resolve().parents[1] / "plugin/dinoprop/demo_data/clothing/shoes").glob("*.jpg")
)
ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def lite0():
    """The pretrained offline backbone: real features, so cosines mean something."""
    return load_model("efficientnet-lite0", device="cpu", precision="fp32")


def _cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _embed_files(paths, model, **kwargs):
    """compute_embeddings on one sample per file; returns (results, vectors by path)."""
    import fiftyone as fo

    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in paths])
    try:
        results = de.compute_embeddings(dataset, model=model, num_workers=0, **kwargs)
        vectors = dict(zip(dataset.values("filepath"), dataset.values(FIELD)))
        return results, vectors
    finally:
        dataset.delete()


def _exif_rotated_copy(tmp_path):
    """The demo photo, and the same photo stored sideways with orientation 6."""
    upright = Image.open(DEMO_PHOTO).convert("RGB")
    assert upright.width != upright.height  # so a wrong orientation shows
    upright_path, rotated_path = tmp_path / "upright.jpg", tmp_path / "rotated.jpg"
    upright.save(upright_path, quality=95)
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated_path, quality=95, exif=exif)
    return upright_path, rotated_path


def test_exif_rotated_photo_embeds_like_the_upright_one(tmp_path, lite0):
    upright, rotated = _exif_rotated_copy(tmp_path)
    results, vectors = _embed_files([upright, rotated], lite0)
    assert results.num_embedded == 2
    assert _cosine(vectors[str(upright)], vectors[str(rotated)]) >= 0.99


def test_exif_orientation_applies_to_object_patches(tmp_path, lite0):
    import fiftyone as fo

    upright, rotated = _exif_rotated_copy(tmp_path)
    box = fo.Detection(label="shoe", bounding_box=[0.1, 0.2, 0.6, 0.5])  # upright coordinates
    dataset = fo.Dataset()
    dataset.add_samples([
        fo.Sample(filepath=str(p), boxes=fo.Detections(detections=[box.copy()]))
        for p in (upright, rotated)
    ])
    try:
        de.compute_embeddings(
            dataset, model=lite0, patches_field="boxes", embeddings_field="e", num_workers=0
        )
        a, b = [d[0] for d in dataset.values("boxes.detections.e")]
        assert _cosine(a, b) >= 0.99
    finally:
        dataset.delete()


def test_gpu_decode_path_applies_exif_orientation(tmp_path):
    """EXIF-rotated JPEGs skip nvJPEG (which ignores orientation) for PIL."""
    from dinoprop.embeddings_data import EncodedItems, collate_encoded, decode_on_device

    upright, rotated = map(str, _exif_rotated_copy(tmp_path))
    preprocessing = Preprocessing(crop_size=56, resize_size=64)
    items = EncodedItems([upright, rotated], preprocessing)
    assert items[0][1].dim() == 1 and items[1][1].dim() == 3  # bytes / decoded
    indices, encoded, _, failures = collate_encoded([items[0], items[1]])
    kept, batch, more = decode_on_device(
        indices, encoded, [upright, rotated], preprocessing, torch.device("cpu")
    )
    assert kept == [0, 1] and not failures + more
    assert (batch[0].float() - batch[1].float()).abs().mean() < 3.0


def _grey_versions(tmp_path):
    """The demo photo in grey as 8-bit PNG, 16-bit PNG and float TIFF."""
    grey = np.asarray(Image.open(DEMO_PHOTO).convert("L"))
    paths = {
        "L": tmp_path / "grey8.png",
        "I;16": tmp_path / "grey16.png",
        "F": tmp_path / "grey-float.tif",
    }
    Image.fromarray(grey).save(paths["L"])
    Image.fromarray(grey.astype(np.uint16) * 257).save(paths["I;16"])
    Image.fromarray(grey.astype(np.float32) / 255).save(paths["F"])
    for mode, path in paths.items():
        assert Image.open(path).mode == mode
    return paths


def test_high_bit_depth_images_embed_like_their_8_bit_version(tmp_path, lite0):
    paths = _grey_versions(tmp_path)
    results, vectors = _embed_files(paths.values(), lite0)
    assert results.num_embedded == 3
    reference = vectors[str(paths["L"])]
    for mode in ("I;16", "F"):
        assert _cosine(vectors[str(paths[mode])], reference) >= 0.99, mode


def test_high_bit_depth_object_patches_are_scaled_too(tmp_path):
    from dinoprop.embeddings_data import PatchItems

    paths = _grey_versions(tmp_path)
    items = PatchItems([str(p) for p in paths.values()], [[[0.1, 0.1, 0.8, 0.8]]] * 3,
                       Preprocessing(crop_size=56, resize_size=64), 16)
    crops = [items[i][1].float() for i in range(3)]
    assert (crops[1] - crops[0]).abs().mean() < 1.0 and (crops[2] - crops[0]).abs().mean() < 1.0


def test_extreme_aspect_ratio_is_a_reported_failure(tmp_path, lite0):
    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (20000, 1), (90, 120, 200)).save(sliver)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (64, 48), (90, 120, 200)).save(ok)
    results, _ = _embed_files([sliver, ok], lite0)
    assert (results.num_embedded, results.num_failed) == (1, 1)
    assert results.failures[0][1].startswith("extreme aspect ratio: 20000x1")


def test_extreme_aspect_ratio_peak_memory_stays_small(tmp_path):
    """Today's 6.4 GB: measured in a fresh process, on both CPU entry points."""
    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (20000, 1), (90, 120, 200)).save(sliver)
    script = (
        "import resource, sys\n"
        "from PIL import Image\n"
        "from dinoprop.models import Preprocessing, open_image, preprocess_image\n"
        "from dinoprop.embeddings_data import ImageItems\n"
        "p = Preprocessing()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "_, tensor, error = ImageItems([sys.argv[1]], p)[0]\n"
        "try:\n"
        "    preprocess_image(Image.new('RGB', (20000, 1)), p)\n"
        "except Exception as e:\n"
        "    error += ' / ' + type(e).__name__\n"
        "extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(extra // 1024, error)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(sliver)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    extra_mb, reason = child.stdout.strip().split(" ", 1)
    assert int(extra_mb) < 50
    assert reason.startswith("extreme aspect ratio") and reason.endswith("UnsupportedImage")


def test_decompression_bombs_are_reported_failures(tmp_path, monkeypatch, lite0):
    """Pillow's bomb warning and error become failures; JPEGs count once drafted."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600_000)
    png_warned = tmp_path / "warned.png"  # over the limit: Pillow only warns
    Image.new("RGB", (1000, 900), (10, 200, 30)).save(png_warned)
    png_bomb = tmp_path / "bomb.png"  # over twice the limit: Pillow raises
    Image.new("RGB", (1300, 1000), (10, 200, 30)).save(png_bomb)
    big_jpeg = tmp_path / "big.jpg"  # over the limit, but drafted to 1/2
    Image.new("RGB", (1200, 900), (10, 200, 30)).save(big_jpeg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        results, vectors = _embed_files([png_warned, png_bomb, big_jpeg], lite0)
    assert (results.num_embedded, results.num_failed) == (1, 2)
    assert [reason.split(":")[0] for _, reason in results.failures] == ["image too large"] * 2
    assert vectors[str(big_jpeg)] is not None
    assert "1000x900 is 900000 pixels" in results.failures[0][1]


def test_open_image_refuses_before_decoding(tmp_path, monkeypatch):
    from dinoprop.models import UnsupportedImage

    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(UnsupportedImage, match="image too large"):
        open_image(str(path), Preprocessing())


def test_ordinary_images_are_unchanged(tmp_path):
    """The 8-bit upright path still equals PIL's own convert + resize + crop."""
    path = tmp_path / "plain.png"
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    preprocessing = Preprocessing(crop_size=56, resize_size=64)
    ours = preprocess_image(open_image(str(path), preprocessing), preprocessing)
    reference = Image.fromarray(pixels).resize((85, 64), Image.BICUBIC).crop((14, 4, 70, 60))
    assert torch.equal(ours, torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1))
