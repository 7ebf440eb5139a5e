"""The engine's input pipeline: large model batches decoded as chunks by
several workers at once and gathered again, in order."""

import numpy as np

import dinoprop.embeddings_data as data
from dinoprop.embeddings import EmbeddingEngine
from dinoprop.models import load_model


def test_chunks_tile_every_model_batch_exactly():
    chunks = list(data.ChunkSampler(1100, 512))
    sizes = [len(c) for c in chunks]
    assert sizes == [64] * 16 + [38, 38]  # 512 = 8 x 64, the last 76 = 2 x 38
    assert [i for c in chunks for i in c] == list(range(1100))
    assert len(data.ChunkSampler(1100, 512)) == len(chunks)


def _run(paths, model, boxes=None, **options):
    engine = EmbeddingEngine(model, **options)
    batches = list(engine.run(paths, boxes=boxes))
    return batches, engine.stats


def test_gathered_batches_equal_unchunked_ones(image_items, tiny_dinov2_dir, tmp_path, monkeypatch):
    paths = [str(p) for p, _ in image_items]
    paths.insert(9, str(tmp_path / "missing.jpg"))
    model = load_model(tiny_dinov2_dir, device="cpu", precision="fp32")
    whole, _ = _run(paths, model, batch_size=7, num_workers=0)  # 7 <= 64: one chunk per batch

    monkeypatch.setattr(data, "DECODE_CHUNK", 3)  # each batch of 7: chunks of 2, 2, 3
    gathered, stats = _run(paths, model, batch_size=7, num_workers=2)

    def positions(batch):
        return sorted(batch.indices + [i for i, _ in batch.failures])

    assert [positions(b) for b in gathered] == [positions(b) for b in whole]
    assert [positions(b) for b in gathered][:2] == [list(range(7)), list(range(7, 14))]
    assert [b.failures for b in gathered] == [b.failures for b in whole]
    assert gathered[1].failures == [(9, "file not found: %s" % paths[9])]
    np.testing.assert_allclose(np.concatenate([b.vectors for b in gathered]),
                               np.concatenate([b.vectors for b in whole]), atol=1e-6)
    assert stats["images"] == len(paths) - 1 and 0 < stats["first_batch_seconds"] <= stats["seconds"]


def test_box_crops_keep_their_counts_across_chunks(image_items, tiny_dinov2_dir, monkeypatch):
    paths = [str(p) for p, _ in image_items][:10]
    boxes = [[[0.1, 0.1, 0.5, 0.5]] * (1 + i % 3) for i in range(len(paths))]
    model = load_model(tiny_dinov2_dir, device="cpu", precision="fp32")
    whole, _ = _run(paths, model, boxes=boxes, batch_size=5, num_workers=0)

    monkeypatch.setattr(data, "DECODE_CHUNK", 2)
    gathered, _ = _run(paths, model, boxes=boxes, batch_size=5, num_workers=1)

    assert [b.counts for b in gathered] == [b.counts for b in whole]
    assert [c for b in gathered for c in b.counts] == [len(b) for b in boxes]
    np.testing.assert_allclose(np.concatenate([b.vectors for b in gathered]),
                               np.concatenate([b.vectors for b in whole]), atol=1e-6)


def test_device_resizes_batch_images_of_one_size_in_few_calls(monkeypatch):
    import torch

    from dinoprop.models import Preprocessing

    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 60, 90), (3, 80, 50), (3, 60, 90), (3, 60, 90), (3, 80, 50)]
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=generator) for s in shapes]
    preprocessing = Preprocessing(crop_size=28, resize_size=32)
    one_by_one = [data.resize_crop_tensors([image], preprocessing)[0] for image in images]

    calls = []
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate",
                        lambda x, **kw: calls.append(len(x)) or interpolate(x, **kw))
    monkeypatch.setattr(data, "RESIZE_VALUES_PER_CALL", 2 * 3 * 60 * 90)  # 2 of the 60 x 90 per call
    together = data.resize_crop_tensors(images, preprocessing)

    assert sorted(calls) == [1, 2, 2]  # 60 x 90: 2 + 1 images; 80 x 50: both at once
    assert all(t.shape == (3, 28, 28) and t.dtype == torch.uint8 for t in together)
    for alone, batched in zip(one_by_one, together):
        assert torch.equal(alone, batched)
