"""compute_embeddings: storage, resuming, failures, patches, bad input."""

import json

import numpy as np
import pytest
import torch

import dinoprop.embeddings as de
from dinoprop.core import DinopropError
from dinoprop.models import EmbeddingModel, load_model, open_image, preprocess_image

from conftest import SHARED_DATASETS

FIELD = "dinoprop_embedding"


@pytest.fixture
def count_forward(monkeypatch):
    """Counts the images the model embeds, by wrapping EmbeddingModel.embed."""
    seen = []
    original = EmbeddingModel.embed

    def counting(self, images, **kwargs):
        seen.append(len(images))
        return original(self, images, **kwargs)

    monkeypatch.setattr(EmbeddingModel, "embed", counting)
    return seen


def _snapshot(dataset):
    """What a failed call must leave unchanged."""
    dataset.reload()
    schema = sorted(dataset.get_field_schema(flat=True))
    return schema, dataset.list_runs(), dataset.count_values("ground_truth.label")


def test_embeddings_stored_as_unit_vectors(image_dataset, tiny_dinov2_dir):
    import fiftyone as fo

    labels_before = image_dataset.values("label.label")
    results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=0)

    assert results.num_embedded == len(image_dataset) == 24
    assert (results.num_skipped, results.num_failed, results.dim) == (0, 0, 32)
    assert results.device == "cpu" and results.images_per_second > 0
    summary = results.summary()
    assert json.loads(json.dumps(summary))["num_embedded"] == 24
    assert isinstance(image_dataset.get_field(FIELD), fo.VectorField)
    vectors = np.stack(image_dataset.values(FIELD))
    assert vectors.shape == (24, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert image_dataset.values("label.label") == labels_before

    run = de.get_embeddings_run(image_dataset, FIELD)
    assert run["fingerprint"] == results.fingerprint and run["status"] == "completed"
    assert image_dataset.load_run_results(results.run_key).num_embedded == 24


def test_stored_vectors_equal_the_model_output(image_dataset, tiny_dinov2_dir):
    de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, pooling="cls+mean", normalize=False,
        num_workers=1, batch_size=5,
    )
    model = load_model(tiny_dinov2_dir, device="cpu")
    sample = image_dataset.first()
    image = open_image(sample.filepath, model.preprocessing)
    expected = model.embed(
        preprocess_image(image, model.preprocessing)[None], pooling="cls+mean", normalize=False
    )[0]
    assert expected.shape == (64,)
    np.testing.assert_allclose(sample[FIELD], expected, atol=1e-5)
    assert abs(np.linalg.norm(expected) - 1) > 1e-3  # really not normalised


def test_rerun_after_crash_embeds_only_missing_samples(
    image_dataset, tiny_dinov2_dir, monkeypatch, count_forward
):
    from dinoprop.embeddings import writer

    written = []
    original_write = writer._write_chunk

    def crash_after_two_chunks(dataset, path, values, label_values):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(sorted(values))
        original_write(dataset, path, values, label_values)

    monkeypatch.setattr(writer, "_write_chunk", crash_after_two_chunks)
    with pytest.raises(RuntimeError, match="simulated crash"):
        de.compute_embeddings(
            image_dataset, model=tiny_dinov2_dir, batch_size=4, chunk_size=4, num_workers=0
        )
    stored_ids = [i for c in written for i in c]
    assert len(stored_ids) == 8
    image_dataset.reload()
    stored = dict(zip(*image_dataset.exists(FIELD).values(["id", FIELD])))
    assert sorted(stored) == sorted(stored_ids)
    assert de.get_embeddings_run(image_dataset, FIELD)["status"] == "failed"  # the exception was seen

    monkeypatch.setattr(writer, "_write_chunk", original_write)
    count_forward.clear()
    results = de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, batch_size=4, num_workers=0
    )
    assert sum(count_forward) == 16  # none of the 8 stored samples again
    assert (results.num_embedded, results.num_skipped) == (16, 8)
    assert image_dataset.count(FIELD) == 24
    for sample_id, vector in stored.items():
        np.testing.assert_array_equal(image_dataset[sample_id][FIELD], vector)

    count_forward.clear()
    again = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=0)
    assert (again.num_embedded, again.num_skipped, sum(count_forward)) == (0, 24, 0)
    redo = de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, num_workers=0, overwrite=True
    )
    assert (redo.num_embedded, redo.num_skipped, sum(count_forward)) == (24, 0, 24)


def test_vectors_of_unknown_origin_are_not_mixed_with_ours(embedded_dataset, tiny_dinov2_dir):
    before = embedded_dataset.values(FIELD)
    with pytest.raises(DinopropError, match="unknown source"):
        de.compute_embeddings(embedded_dataset, model=tiny_dinov2_dir)
    assert all(np.array_equal(a, b) for a, b in zip(before, embedded_dataset.values(FIELD)))


def test_other_model_settings_never_mix_in_one_field(image_dataset, tiny_dinov2_dir):
    de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=0)
    with pytest.raises(DinopropError, match="pooling.*overwrite=True"):
        de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, pooling="mean")
    # overwriting only part of the field with other settings would mix them
    with pytest.raises(DinopropError, match="19 vectors outside this view"):
        de.compute_embeddings(
            image_dataset.limit(5), model=tiny_dinov2_dir, pooling="mean",
            overwrite=True, num_workers=0,
        )
    assert de.get_embeddings_run(image_dataset, FIELD)["pooling"] == "cls"
    results = de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, pooling="mean", overwrite=True, num_workers=0
    )
    assert results.num_embedded == 24
    assert de.get_embeddings_run(image_dataset, FIELD)["pooling"] == "mean"


def test_flip_averaged_vectors_are_recorded_and_never_mixed(image_dataset, tiny_dinov2_dir):
    results = de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, flip_average=True, num_workers=0
    )
    assert results.flip_average and results.num_embedded == 24
    model = load_model(tiny_dinov2_dir, device="cpu")
    sample = image_dataset.first()
    pixels = preprocess_image(open_image(sample.filepath, model.preprocessing), model.preprocessing)
    expected = model.embed(pixels[None], flip_average=True)[0]
    np.testing.assert_allclose(sample[FIELD], expected, atol=1e-5)
    assert de.get_embeddings_run(image_dataset, FIELD)["flip_average"] is True

    with pytest.raises(DinopropError, match="other settings \\(flip_average\\)"):
        de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=0)
    again = de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, flip_average=True, num_workers=0
    )
    assert (again.num_embedded, again.num_skipped) == (0, 24)


def test_runs_recorded_before_flip_average_resume_without_it(image_dataset, tiny_dinov2_dir):
    de.compute_embeddings(image_dataset.limit(10), model=tiny_dinov2_dir, num_workers=0)
    run_key = de.run_key_for(FIELD)
    config = image_dataset.get_run_info(run_key).config
    del config.flip_average  # as recorded by dinoprop versions without the setting
    image_dataset.update_run_config(run_key, config)
    assert "flip_average" not in de.get_embeddings_run(image_dataset, FIELD)

    results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=0)
    assert (results.num_embedded, results.num_skipped) == (14, 10)


def test_unreadable_images_are_skipped_and_reported(image_dataset, tiny_dinov2_dir, tmp_path):
    import fiftyone as fo

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    bad = [fo.Sample(filepath=str(tmp_path / "missing.jpg")), fo.Sample(filepath=str(corrupt))]
    bad_ids = image_dataset.add_samples(bad)

    results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=1)
    assert (results.num_embedded, results.num_failed) == (24, 2)
    reasons = dict(results.failures)
    assert sorted(reasons) == sorted(bad_ids)
    assert "not found" in reasons[bad_ids[0]] and reasons[bad_ids[1]]
    assert image_dataset.count(FIELD) == 24

    with pytest.raises(DinopropError, match=bad_ids[0]):
        de.compute_embeddings(
            image_dataset, model=tiny_dinov2_dir, skip_failures=False, num_workers=0
        )
    # the failed rerun is recorded as failed, with what it did, not "running"
    assert de.get_embeddings_run(image_dataset, FIELD)["status"] == "failed"
    recorded = image_dataset.load_run_results(de.run_key_for(FIELD))
    assert recorded.num_failed == 1 and bad_ids[0] in str(recorded.failures)
    assert image_dataset.count(FIELD) == 24


def _add_unreadable_samples(dataset, directory):
    """A missing file, a corrupt JPEG and a 20000x1 sliver; returns the paths."""
    import fiftyone as fo
    from PIL import Image

    corrupt = directory / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    sliver = directory / "sliver.png"
    Image.new("RGB", (20000, 1)).save(sliver)
    paths = [str(directory / "missing.jpg"), str(corrupt), str(sliver)]
    dataset.add_samples([fo.Sample(filepath=p) for p in paths])
    return paths


def test_failures_are_counted_by_reason_and_logged(image_dataset, tiny_dinov2_dir, tmp_path, caplog):
    import logging

    paths = _add_unreadable_samples(image_dataset, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dinoprop.embeddings"):
        results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=0)
    assert (results.num_embedded, results.num_failed) == (24, 3)
    assert results.failure_counts == {
        "file not found": 1, "unreadable image": 1, "extreme aspect ratio": 1,
    }
    assert [e.split(" (")[0] for e in results.failure_examples] == paths
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "3 images could not be embedded" in message
    assert "1 file not found" in message and "1 extreme aspect ratio" in message
    assert all(path in message for path in paths)
    assert results.summary()["failure_report"] == results.failure_report()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinoprop.embeddings"):
        clean = de.compute_embeddings(image_dataset.limit(24), model=tiny_dinov2_dir)
    assert clean.num_failed == 0 and not caplog.records
    assert clean.summary()["failure_report"] == "none"


def test_progress_callable_is_called(image_dataset, tiny_dinov2_dir):
    calls = []
    de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, num_workers=0, batch_size=8,
        progress=lambda pb: calls.append(pb.progress),
    )
    assert calls and calls[-1] == pytest.approx(1.0)


def test_view_embeds_only_its_samples(image_dataset, tiny_dinov2_dir):
    view = image_dataset.match_tags("none").limit(0)
    assert len(view) == 0
    subset = image_dataset.take(5, seed=0)
    results = de.compute_embeddings(subset, model=tiny_dinov2_dir, num_workers=0)
    assert results.num_embedded == 5 and image_dataset.count(FIELD) == 5
    rest = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=0)
    assert (rest.num_embedded, rest.num_skipped) == (19, 5)


def _add_boxes(dataset):
    import fiftyone as fo

    for i, sample in enumerate(dataset.limit(4)):
        sample["boxes"] = fo.Detections(detections=[
            fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.5, 0.6]),
            fo.Detection(label="tiny", bounding_box=[0.9, 0.9, 0.01, 0.01]),
        ][: 1 + i % 2])
        sample["shapes"] = fo.Polylines(polylines=[
            fo.Polyline(label="p", points=[[(0.2, 0.2), (0.6, 0.3), (0.4, 0.8)]], closed=True),
        ])
        sample.save()


def test_patch_embeddings_stored_on_each_label(image_dataset, tiny_dinov2_dir, count_forward):
    _add_boxes(image_dataset)
    results = de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, patches_field="boxes",
        embeddings_field="embedding", num_workers=0, batch_size=2,
    )
    assert (results.num_embedded, results.num_failed) == (6, 0)
    assert max(count_forward) <= 2
    vectors = [v for vs in image_dataset.values("boxes.detections.embedding") if vs for v in vs]
    assert len(vectors) == 6
    assert all(v.shape == (32,) and abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert not image_dataset.has_field(FIELD)

    count_forward.clear()
    again = de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, patches_field="boxes", embeddings_field="embedding"
    )
    assert (again.num_embedded, again.num_skipped, sum(count_forward)) == (0, 6, 0)
    with pytest.raises(DinopropError, match="boxes.detections.embedding"):
        de.compute_embeddings(
            image_dataset, model=tiny_dinov2_dir, patches_field="boxes",
            embeddings_field="embedding", pooling="mean",
        )

    polys = de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, patches_field="shapes",
        embeddings_field="embedding", num_workers=0,
    )
    assert polys.num_embedded == 4
    assert image_dataset.count("shapes.polylines.embedding") == 4


def test_token_patch_mode_embeds_each_image_once_and_pools_its_boxes(
    image_dataset, tiny_dinov2_dir, monkeypatch
):
    from dinoprop.embeddings import embed_files
    from dinoprop.models import preprocess_whole_image

    _add_boxes(image_dataset)
    model = load_model(tiny_dinov2_dir, device="cpu")
    passes = []
    forward = EmbeddingModel.forward_features
    monkeypatch.setattr(EmbeddingModel, "forward_features",
                        lambda self, images: passes.append(len(images)) or forward(self, images))
    results = de.compute_embeddings(
        image_dataset, model=model, patches_field="boxes", embeddings_field="tok",
        patch_mode="tokens", num_workers=0, batch_size=3,
    )
    boxed = image_dataset.exists("boxes")
    assert (results.num_embedded, results.patch_mode, results.pooling) == (6, "tokens", "mean")
    assert sum(passes) == len(boxed) == 4 and max(passes) <= 3  # one pass per image, not per box
    paths, boxes, stored = boxed.values(
        ["filepath", "boxes.detections.bounding_box", "boxes.detections.tok"])
    whole = torch.stack([preprocess_whole_image(open_image(p, model.preprocessing),
                                                model.preprocessing) for p in paths])
    expected = model.embed_boxes(whole, boxes)
    np.testing.assert_allclose(np.stack([v for vs in stored for v in vs]), expected, atol=1e-5)
    batches = list(embed_files(paths, model=model, boxes=boxes, patch_mode="tokens", num_workers=0))
    assert [c for b in batches for c in b.counts] == [1, 2, 1, 2]
    np.testing.assert_allclose(np.concatenate([b.vectors for b in batches]), expected, atol=1e-5)

    assert de.get_embeddings_run(image_dataset, "tok", "boxes")["patch_mode"] == "tokens"
    with pytest.raises(DinopropError, match="other settings \\(pooling, patch_mode\\)"):
        de.compute_embeddings(image_dataset, model=model, patches_field="boxes",
                              embeddings_field="tok")  # crops never mix with tokens
    again = de.compute_embeddings(image_dataset, model=model, patches_field="boxes",
                                  embeddings_field="tok", patch_mode="tokens", pooling="mean")
    assert (again.num_embedded, again.num_skipped) == (0, 6)


def test_the_storage_free_engine_gives_compute_embeddings_vectors(
    image_dataset, tiny_dinov2_dir, tmp_path
):
    from dinoprop.embeddings import embed_files

    de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, pooling="cls+mean", flip_average=True,
        num_workers=0, batch_size=5,
    )
    _add_boxes(image_dataset)
    de.compute_embeddings(
        image_dataset, model=tiny_dinov2_dir, patches_field="boxes",
        embeddings_field="embedding", num_workers=0,
    )
    stored = dict(zip(*image_dataset.values(["filepath", FIELD])))
    paths = sorted(stored) + [str(tmp_path / "missing.jpg")]
    vectors, failures = {}, []
    for batch in embed_files(paths, model=tiny_dinov2_dir, pooling="cls+mean",
                             flip_average=True, num_workers=1, batch_size=7):
        vectors.update(zip((paths[i] for i in batch.indices), batch.vectors))
        failures += batch.failures
    assert sorted(vectors) == sorted(stored)
    for path, vector in stored.items():
        np.testing.assert_allclose(vectors[path], vector, atol=1e-5)
    assert failures == [(len(paths) - 1, "file not found: %s" % paths[-1])]
    # boxes: one vector per box, in order, as compute_embeddings stored them
    boxed = image_dataset.exists("boxes")
    box_paths, boxes, box_vectors = boxed.values(
        ["filepath", "boxes.detections.bounding_box", "boxes.detections.embedding"]
    )
    batches = list(embed_files(box_paths, model=tiny_dinov2_dir, boxes=boxes, num_workers=0))
    assert [c for b in batches for c in b.counts] == [len(b) for b in boxes]
    np.testing.assert_allclose(
        np.concatenate([b.vectors for b in batches]),
        np.stack([v for vs in box_vectors for v in vs]), atol=1e-5,
    )


def test_the_engine_imports_no_fiftyone():
    import subprocess
    import sys

    code = (
        "import sys, dinoprop.embeddings as e; e.EmbeddingEngine, e.embed_files; "
        "print(sorted(m for m in ('fiftyone', 'torch', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tiny_and_edge_boxes_are_padded_not_crashed():
    from PIL import Image

    from dinoprop.embeddings_data import crop_box

    image = Image.new("RGB", (100, 50), (10, 20, 30))
    for box in ([0.99, 0.99, 0.001, 0.001], [0.0, 0.0, 0.0, 0.0], [0.5, 0.2, 0.5, 0.8]):
        tensor = crop_box(image, box, 56, min_pixels=16)
        assert tensor.shape == (3, 56, 56) and tensor.dtype == torch.uint8


def _video_dataset(tmp_path):
    import fiftyone as fo

    dataset = fo.Dataset()
    dataset.add_sample(fo.Sample(filepath=str(tmp_path / "clip.mp4")))
    return dataset


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="no-such/model-here"), "no-such/model-here"),
        (dict(model="dinov2-small"), "efficientnet-lite0"),
        (dict(embeddings_field="ground_truth"), "ground_truth"),
        (dict(embeddings_field="bad.name"), "top-level field name"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-3), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(pooling="max"), "pooling"),
        (dict(image_size=0), "image_size"),
        (dict(image_size=False), "image_size"),
        (dict(patches_field="label"), "Detections or Polylines"),
        (dict(patches_field="missing"), "does not exist"),
        (dict(patch_mode="pixels"), "Unknown patch_mode"),
        (dict(patch_mode="tokens"), "embeds the boxes of patches_field"),
        (dict(patches_field="boxes", patch_mode="tokens", pooling="cls+mean"), "cls\\+mean"),
    ],
)
def test_bad_input_raises_one_clear_error_and_changes_nothing(
    image_dataset, tiny_dinov2_dir, kwargs, match
):
    before = _snapshot(image_dataset)
    kwargs = {"model": tiny_dinov2_dir, **kwargs}
    with pytest.raises(DinopropError, match=match):
        de.compute_embeddings(image_dataset, **kwargs)
    assert _snapshot(image_dataset) == before
    assert not image_dataset.has_field(FIELD)


def test_image_size_a_loaded_model_would_ignore_is_refused(image_dataset, tiny_dinov2_dir):
    model = load_model(tiny_dinov2_dir, device="cpu")
    with pytest.raises(DinopropError, match="image_size=112 differs from the loaded model's 224"):
        de.compute_embeddings(image_dataset, model=model, image_size=112)
    with pytest.raises(DinopropError, match="image_size must be a positive integer"):
        de.compute_embeddings(image_dataset, model=model, image_size=0)
    assert not image_dataset.has_field(FIELD)
    results = de.compute_embeddings(image_dataset, model=model, image_size=224, num_workers=0)
    assert results.num_embedded == 24
    with pytest.warns(UserWarning, match="using 98"):  # rounded to whole 14-px patches
        rounded = load_model(tiny_dinov2_dir, device="cpu", image_size=100)
    with pytest.warns(UserWarning, match="using 98"):
        again = de.compute_embeddings(image_dataset, model=rounded, image_size=100,
                                      embeddings_field="rounded", num_workers=0)
    assert again.num_embedded == 24


def test_empty_view_and_video_dataset_are_rejected(image_dataset, tiny_dinov2_dir, tmp_path):
    with pytest.raises(DinopropError, match="empty"):
        de.compute_embeddings(image_dataset.limit(0), model=tiny_dinov2_dir)
    video = _video_dataset(tmp_path)
    with pytest.raises(DinopropError, match="media type 'video'"):
        de.compute_embeddings(video, model=tiny_dinov2_dir)
    assert not video.has_field(FIELD) and not video.list_runs()
    video.delete()


@pytest.mark.skipif(
    not (SHARED_DATASETS / "clothing-small").is_dir(), reason="shared datasets missing"
)
def test_real_photos_cluster_by_class_with_the_offline_backbone():
    import fiftyone as fo

    root = SHARED_DATASETS / "clothing-small" / "test"
    dataset = fo.Dataset()
    for label in ("shoes", "pants"):
        paths = sorted((root / label).glob("*.jpg"))[:10]
        dataset.add_samples([
            fo.Sample(filepath=str(p), ground_truth=fo.Classification(label=label))
            for p in paths
        ])
    try:
        results = de.compute_embeddings(dataset, model="efficientnet-lite0", batch_size=8)
        assert (results.num_embedded, results.dim) == (20, 1280)
        vectors = np.stack(dataset.values(FIELD))
        labels = np.array(dataset.values("ground_truth.label"))
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        nearest = sims.argmax(1)
        assert (labels[nearest] == labels).mean() >= 0.9
    finally:
        dataset.delete()


def test_device_decoding_matches_the_cpu_pipeline(image_items, tmp_path):
    """The GPU decoding path, exercised on the CPU (same code, device='cpu')."""
    from PIL import Image

    from dinoprop.embeddings_data import EncodedItems, collate_encoded, decode_on_device
    from dinoprop.models import Preprocessing

    png = tmp_path / "image.png"
    Image.open(image_items[0][0]).save(png)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 broken")
    paths = [image_items[0][0], image_items[9][0], str(png), str(corrupt), str(tmp_path / "gone.jpg")]
    preprocessing = Preprocessing(crop_size=56, resize_size=64)
    items = EncodedItems(paths, preprocessing)
    indices, encoded, _, failures = collate_encoded([items[i] for i in range(len(paths))])
    kept, batch, more = decode_on_device(indices, encoded, paths, preprocessing, torch.device("cpu"))

    assert kept == [0, 1, 2] and batch.shape == (3, 3, 56, 56) and batch.dtype == torch.uint8
    assert [i for i, _ in failures + more] == [4, 3]
    for position, path in enumerate(paths[:3]):
        reference = preprocess_image(open_image(path, preprocessing), preprocessing)
        assert (batch[position].float() - reference.float()).abs().mean() < 2.0


def test_gpu_decoding_needs_cuda(image_dataset, tiny_dinov2_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DinopropError, match="CUDA"):
        de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, gpu_decode=True)
    assert not image_dataset.has_field(FIELD)


def test_group_dataset_embeds_every_image_slice(image_items, tiny_dinov2_dir):
    import fiftyone as fo

    dataset = fo.Dataset()
    dataset.add_group_field("group", default="left")
    samples = []
    for i in range(3):
        group = fo.Group()
        for j, slice_name in enumerate(("left", "right")):
            path = image_items[2 * i + j][0]
            samples.append(fo.Sample(filepath=path, group=group.element(slice_name)))
    dataset.add_samples(samples)
    try:
        results = de.compute_embeddings(dataset, model=tiny_dinov2_dir, num_workers=0)
        assert results.num_embedded == 6
        assert dataset.select_group_slices().count(FIELD) == 6
        again = de.compute_embeddings(dataset, model=tiny_dinov2_dir, num_workers=0)
        assert (again.num_embedded, again.num_skipped) == (0, 6)
    finally:
        dataset.delete()


def test_killed_process_resumes_in_a_fresh_one(image_dataset, tiny_dinov2_dir, count_forward):
    import os
    import subprocess
    import sys

    image_dataset.persistent = True  # so the child process can load it
    script = (
        "import os, fiftyone as fo, dinoprop.embeddings as de\n"
        "from dinoprop.embeddings import writer\n"
        "written = []\n"
        "original = writer._write_chunk\n"
        "def kill_after_two_chunks(*args):\n"
        "    if len(written) == 2:\n"
        "        os._exit(3)\n"
        "    written.append(1)\n"
        "    original(*args)\n"
        "writer._write_chunk = kill_after_two_chunks\n"
        "de.compute_embeddings(fo.load_dataset(%r), model=%r, batch_size=4,\n"
        "                      chunk_size=4, num_workers=0, progress=False)\n"
        % (image_dataset.name, tiny_dinov2_dir)
    )
    child = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), timeout=300)
    assert child.returncode == 3
    image_dataset.reload()
    assert image_dataset.count(FIELD) == 8

    results = de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, num_workers=0)
    assert (results.num_embedded, results.num_skipped, sum(count_forward)) == (16, 8, 16)


def _many_samples(image_items, n):
    """A persistent dataset of ``n`` samples cycling over the generated images."""
    import fiftyone as fo

    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=image_items[i % len(image_items)][0]) for i in range(n)])
    dataset.persistent = True  # so a child process can load it
    return dataset


_SLOW_CHILD = (
    "import sys, time, fiftyone as fo, dinoprop.embeddings as de\n"
    "from dinoprop.models import EmbeddingModel\n"
    "log = open(sys.argv[1], 'a', buffering=1)\n"
    "original, done = EmbeddingModel.embed, [0]\n"
    "def slow(self, images, **kwargs):\n"
    "    time.sleep(0.08)\n"
    "    out = original(self, images, **kwargs)\n"
    "    done[0] += len(images)\n"
    "    log.write('%d %f\\n' % (done[0], time.time()))\n"
    "    return out\n"
    "EmbeddingModel.embed = slow\n"
    "de.compute_embeddings(fo.load_dataset(sys.argv[2]), model=sys.argv[3], batch_size=4,\n"
    "                      num_workers=0, progress=False)\n"
)


def _embedded_log(path):
    """``[(images embedded so far, time)]`` as the slow child logged them."""
    lines = path.read_text().split("\n") if path.exists() else []
    return [(int(n), float(t)) for n, t in (line.split() for line in lines if line)]


def test_kill_9_loses_at_most_a_few_seconds_of_work(image_items, tiny_dinov2_dir, tmp_path, count_forward):
    """Killed 4.5 s into embedding 300 images: all but the last 3 s are stored."""
    import os
    import signal
    import subprocess
    import sys
    import time

    dataset = _many_samples(image_items, 300)
    log = tmp_path / "embedded.log"
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD, str(log), dataset.name, tiny_dinov2_dir],
        env=dict(os.environ),
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            embedded = _embedded_log(log)
            if embedded and embedded[-1][1] - embedded[0][1] >= 4.5:
                break
            time.sleep(0.05)
        assert child.poll() is None, "the child finished before it could be killed"
        killed_at = time.time()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    embedded = _embedded_log(log)
    assert 0 < embedded[-1][0] < 300  # killed mid-run
    committed_by_then = max(n for n, t in embedded if t <= killed_at - 3.0)
    dataset.reload()
    stored = dataset.count(FIELD)
    assert committed_by_then <= stored <= embedded[-1][0]

    results = de.compute_embeddings(dataset, model=tiny_dinov2_dir, num_workers=0)
    assert (results.num_embedded, results.num_skipped) == (300 - stored, stored)
    assert sum(count_forward) == 300 - stored
    dataset.delete()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_commits_what_it_computed_and_records_it(
    image_dataset, tiny_dinov2_dir, monkeypatch, error
):
    """Ctrl-C (or a crash) after 5 batches: the 20 vectors are stored, the record says 20."""
    original, calls = EmbeddingModel.embed, []

    def interrupted(self, images, **kwargs):
        calls.append(len(images))
        if len(calls) == 6:
            raise error("interrupted")
        return original(self, images, **kwargs)

    monkeypatch.setattr(EmbeddingModel, "embed", interrupted)
    with pytest.raises(error):
        de.compute_embeddings(image_dataset, model=tiny_dinov2_dir, batch_size=4, num_workers=0)
    image_dataset.reload()
    assert image_dataset.count(FIELD) == 20
    run = de.get_embeddings_run(image_dataset, FIELD)
    recorded = image_dataset.load_run_results(de.run_key_for(FIELD))
    assert run["status"] == "failed" and recorded.num_embedded == 20


def test_group_dataset_without_image_slices_is_rejected(tmp_path, tiny_dinov2_dir):
    import fiftyone as fo

    dataset = fo.Dataset()
    dataset.add_group_field("group", default="front")
    group = fo.Group()
    dataset.add_samples([
        fo.Sample(filepath=str(tmp_path / ("%s.mp4" % name)), group=group.element(name))
        for name in ("front", "back")
    ])
    try:
        with pytest.raises(DinopropError, match="no image slices"):
            de.compute_embeddings(dataset, model=tiny_dinov2_dir)
        assert not dataset.list_runs()
    finally:
        dataset.delete()
