"""raw_values reads what FiftyOne's values(_raw=True) reads, in its order."""

import gc

import numpy as np
import pytest

import fiftyone as fo
from fiftyone import ViewField as F

from dinoprop.bulk_reads import gc_paused, raw_values
from dinoprop.core import load_embeddings

PATHS = [
    "_id", "label", "label._id", "label.label", "label.confidence",
    "label.top", "emb", "tags", "score",
]


@pytest.fixture(scope="module")
def mixed_dataset():
    """Samples with and without labels, attributes, vectors and scores."""
    rng = np.random.default_rng(0)
    dataset = fo.Dataset()
    samples = []
    for i in range(40):
        label = None
        if i % 3:
            label = fo.Classification(label="c%d" % (i % 4), confidence=float(rng.random()))
            if i % 2:
                label["top"] = ["c1", "c2"]
        samples.append(fo.Sample(
            filepath="/synthetic/%d.jpg" % i,
            label=label,
            emb=rng.normal(size=6).astype(np.float32) if i % 5 else None,
            score=float(i) if i % 7 else None,
            tags=["t"] if i % 4 == 0 else [],
        ))
    dataset.add_samples(samples)
    return dataset


def _views(dataset):
    return [
        dataset,
        dataset.match(F("score") > 5).sort_by("score", reverse=True).skip(2),
        dataset.exists("label").select_fields(["label", "emb"]),
        dataset.limit(0),
    ]


def test_raw_values_equals_fiftyone_values(mixed_dataset):
    for view in _views(mixed_dataset):
        paths = [p for p in PATHS if view.get_field(p.split(".")[0]) is not None or p == "_id"]
        ours = raw_values(view, paths)
        theirs = view.values(paths, _raw=True)
        assert [list(c) for c in ours] == [list(c) for c in theirs], view
        assert len(ours[0]) == len(view)


def test_load_embeddings_of_a_view_equals_fiftyone_values(mixed_dataset):
    view = mixed_dataset.sort_by("score", reverse=True).skip(3)
    ids, vectors = load_embeddings(view, "emb")
    expected = [(i, v) for i, v in zip(*view.values(["id", "emb"])) if v is not None]
    assert list(ids) == [i for i, _ in expected]
    np.testing.assert_array_equal(vectors, np.stack([v for _, v in expected]))
    assert vectors.dtype == np.float32


def test_gc_paused_restores_the_collector():
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off: left off
    finally:
        gc.enable()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()


def test_gc_paused_decorates_a_function():
    @gc_paused()
    def collector_state():
        return gc.isenabled()

    assert collector_state() is False
    assert gc.isenabled()
