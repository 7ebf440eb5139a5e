"""read_vectors reads every vector FiftyOne reads, whatever wrote it."""

import numpy as np
import pytest

import fiftyone as fo
import fiftyone.core.fields as fof
from fiftyone import ViewField as F

from dinoprop import vector_reads
from dinoprop.core import DinopropError, load_embeddings
from dinoprop.label_writes import write_vectors


def _dataset(num, dim, dtype=np.float32, seed=0):
    """``num`` samples whose vectors dinoprop's writer stored (uncompressed
    streams), and the vectors."""
    rng = np.random.default_rng(seed)
    dataset = fo.Dataset()
    dataset.add_samples(
        [fo.Sample(filepath="/synthetic/%d.jpg" % i, rank=i) for i in range(num)]
    )
    dataset.add_sample_field("emb", fof.VectorField)
    vectors = rng.normal(size=(num, dim)).astype(dtype)
    write_vectors(dataset._sample_collection, "emb", dataset.values("id"), vectors)
    return dataset, vectors


def _fiftyone_reads(view, field="emb"):
    return [(i, v) for i, v in zip(*view.values(["id", field])) if v is not None]


def _check_equal(view, ids, vectors, field="emb"):
    expected = _fiftyone_reads(view, field)
    assert list(ids) == [i for i, _ in expected]
    np.testing.assert_array_equal(np.asarray(vectors), np.stack([v for _, v in expected]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_uniform_vectors_are_sliced_without_decoding_documents(monkeypatch, dtype):
    # 300 documents of 6 KB come in more than one batch (the first has 101)
    dataset, _ = _dataset(300, 768, dtype)
    view = dataset.match(F("rank") % 7 != 3).sort_by("rank", reverse=True)

    def refuse(batch, field):
        raise AssertionError("a uniform batch was decoded document by document")

    monkeypatch.setattr(vector_reads, "_decoded", refuse)
    ids, vectors = vector_reads.read_vectors(view, "emb")
    assert vectors.dtype == dtype and vectors.shape == (len(view), 768)
    _check_equal(view, ids, vectors)
    dataset.delete()


def test_mixed_batches_read_as_fiftyone_reads_them():
    """Compressed vectors (FiftyOne's writer), missing ones and lists in the
    same batches as uncompressed ones."""
    dataset, _ = _dataset(250, 16)
    rng = np.random.default_rng(1)
    samples = dataset.sort_by("rank")[100:110]
    for sample in samples:  # FiftyOne compresses these
        sample["emb"] = rng.normal(size=16).astype(np.float32)
        sample.save()
    dataset.match(F("rank") % 25 == 0).set_field("emb", None).save()
    ids, vectors = vector_reads.read_vectors(dataset, "emb")
    assert vectors.shape == (240, 16)
    _check_equal(dataset, ids, vectors)
    loaded_ids, loaded = load_embeddings(dataset.skip(5), "emb")
    _check_equal(dataset.skip(5), loaded_ids, loaded)
    dataset.delete()


def test_mixed_dimensions_are_still_refused():
    dataset, _ = _dataset(120, 8)
    write_vectors(
        dataset._sample_collection, "emb", dataset.values("id")[:3],
        np.ones((3, 9), np.float32),
    )
    with pytest.raises(DinopropError, match=r"mixed dimensions \[8, 9\]"):
        load_embeddings(dataset, "emb")
    dataset.delete()


def test_an_altered_uniform_document_is_not_misread():
    """A document that breaks the layout (here a vector of another dtype of
    the same byte length) falls back to decoding, and reads right."""
    dataset, vectors = _dataset(150, 8, np.float32)
    odd = vectors[7].astype(np.float64)[:4]  # 32 bytes, as the others
    write_vectors(dataset._sample_collection, "emb", [dataset.values("id")[7]], [odd])
    ids, read = vector_reads.read_vectors(dataset, "emb")
    assert isinstance(read, list)
    assert read[7].dtype == np.float64 and np.array_equal(read[7], odd)
    assert list(ids) == dataset.values("id")
    np.testing.assert_array_equal(np.stack(read[:7] + read[8:]), np.delete(vectors, 7, axis=0))
    dataset.delete()


def test_an_empty_view_reads_nothing():
    dataset, _ = _dataset(20, 4)
    ids, vectors = vector_reads.read_vectors(dataset.limit(0), "emb")
    assert len(ids) == 0 and len(vectors) == 0
    ids, vectors = load_embeddings(dataset.limit(0), "emb", allow_empty=True)
    assert vectors.shape == (0, 0)
    dataset.delete()
