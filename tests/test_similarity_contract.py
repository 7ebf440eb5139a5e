"""FiftyOne Brain's ``SimilarityIndex`` contract, for dinoprop and the reference.

Every test runs against ``backend="dinoprop"`` and fiftyone-brain's own
``backend="sklearn"``, so a contract that dinoprop breaks fails beside the
reference that keeps it. Datasets are small random vectors (no media).
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fiftyone as fo
import fiftyone.brain as fob

import dinoprop  # registers its backend

NUM, DIM = 30, 8

pytestmark = pytest.mark.parametrize("backend", [dinoprop.SIMILARITY_BACKEND, "sklearn"])


@pytest.fixture
def vectors():
    """``NUM x DIM`` random vectors; row 1 nearly duplicates row 0."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM, DIM))
    x[1] = x[0] + 0.01 * rng.normal(size=DIM)
    return x.astype(np.float32)


@pytest.fixture
def dataset(vectors):
    """``NUM`` samples with ``vectors`` in ``emb`` and two embedded patches each."""
    rng = np.random.default_rng(1)
    samples = []
    for i, v in enumerate(vectors):
        dets = [
            fo.Detection(
                label="x", bounding_box=[0.1, 0.1, 0.2, 0.2], emb=rng.normal(size=DIM)
            )
            for _ in range(2)
        ]
        samples.append(
            fo.Sample(
                filepath="/tmp/contract%03d.jpg" % i,
                emb=v,
                dets=fo.Detections(detections=dets),
            )
        )
    ds = fo.Dataset()
    ds.add_samples(samples)
    ds.add_sample_field("dets.detections.emb", fo.VectorField)
    yield ds
    if fo.dataset_exists(ds.name):
        ds.delete()


def _cosine_order(vectors, query):
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return list(np.argsort(-(x @ (query / np.linalg.norm(query))), kind="stable"))


def _build(dataset, backend, **kwargs):
    kwargs.setdefault("embeddings", "emb")
    return fob.compute_similarity(dataset, brain_key="sim", backend=backend, **kwargs)


def test_sort_by_id_and_by_vector(dataset, vectors, backend):
    _build(dataset, backend)
    ids = dataset.values("id")
    expected = [ids[i] for i in _cosine_order(vectors, vectors[5])[:5]]
    assert dataset.sort_by_similarity(ids[5], k=5, brain_key="sim").values("id") == expected
    by_vector = dataset.sort_by_similarity(vectors[5], k=5, brain_key="sim")
    assert by_vector.values("id") == expected
    least = dataset.sort_by_similarity(vectors[5], k=3, reverse=True, brain_key="sim")
    farthest = _cosine_order(vectors, vectors[5])[::-1][:3]
    assert set(least.values("id")) == {ids[i] for i in farthest}


def test_add_remove_and_get_embeddings(dataset, vectors, backend):
    index = _build(dataset, backend)
    ids = np.array(dataset.values("id"))
    index.remove_from_index(sample_ids=list(ids[:5]))
    assert index.total_index_size == NUM - 5
    assert set(index.sample_ids) == set(ids[5:])
    index.add_to_index(vectors[:5], ids[:5])
    assert index.total_index_size == NUM
    got, got_ids, _ = index.get_embeddings(sample_ids=list(ids[[7, 2]]))
    assert list(got_ids) == list(ids[[7, 2]])
    assert np.allclose(got, vectors[[7, 2]], atol=1e-5)
    with pytest.raises(ValueError):
        index.get_embeddings(sample_ids=["0123456789abcdef01234567"], allow_missing=False)


def test_use_view_restricts_queries(dataset, vectors, backend):
    index = _build(dataset, backend)
    view = dataset.skip(10)
    index.use_view(view)
    assert index.index_size == NUM - 10 and index.total_index_size == NUM
    ranked = index.sort_by_similarity(vectors[0], k=5).values("id")
    assert set(ranked) <= set(view.values("id")) and len(ranked) == 5


def test_reload_follows_the_embeddings_field(dataset, backend):
    index = _build(dataset, backend)
    fresh = np.random.default_rng(9).normal(size=(NUM, DIM)).astype(np.float32)
    dataset.set_values("emb", list(fresh))
    index.reload()
    got, got_ids, _ = index.get_embeddings()
    order = {i: n for n, i in enumerate(dataset.values("id"))}
    assert np.allclose(got, fresh[[order[i] for i in got_ids]], atol=1e-5)


def test_duplicates_and_uniqueness(dataset, backend):
    index = _build(dataset, backend)
    ids = dataset.values("id")
    index.find_duplicates(thresh=1e-3)
    assert set(index.duplicate_ids) | set(index.neighbors_map) == {ids[0], ids[1]}
    fob.compute_uniqueness(dataset, similarity_index="sim")
    assert dataset.count("uniqueness") == NUM


def test_patch_index(dataset, backend):
    fob.compute_similarity(
        dataset, patches_field="dets", embeddings="emb", brain_key="psim", backend=backend
    )
    patches = dataset.to_patches("dets")
    query = patches.first()
    ranked = patches.sort_by_similarity(query.id, k=3, brain_key="psim")
    assert ranked.first().id == query.id and len(ranked) == 3


def test_load_rename_delete_and_clone(dataset, vectors, backend):
    _build(dataset, backend)
    query = dataset.values("id")[3]
    expected = dataset.sort_by_similarity(query, k=4, brain_key="sim").values("id")
    loaded = dataset.load_brain_results("sim", cache=False)
    assert loaded.total_index_size == NUM
    clone = dataset.clone()
    try:
        assert clone.sort_by_similarity(query, k=4, brain_key="sim").values("id") == expected
    finally:
        clone.delete()
    dataset.rename_brain_run("sim", "renamed")
    assert dataset.sort_by_similarity(query, k=4, brain_key="renamed").values("id") == expected
    dataset.delete_brain_run("renamed")
    assert dataset.list_brain_runs() == []
    _build(dataset, backend)  # the key is free again


def test_run_from_an_embeddings_array_reloads(dataset, vectors, backend):
    """Issue 15 A.1: what a new session, the App, clone() and uniqueness do."""
    _build(dataset, backend, embeddings=vectors)
    loaded = dataset.load_brain_results("sim", cache=False)
    assert loaded.total_index_size == NUM
    got, _, _ = loaded.get_embeddings(sample_ids=dataset.values("id")[:3])
    assert np.allclose(got, vectors[:3], atol=1e-5)
    fob.compute_uniqueness(dataset, similarity_index="sim")
    assert dataset.count("uniqueness") == NUM


def test_index_on_a_field_that_does_not_exist_yet(dataset, vectors, backend):
    """Issue 15 A.2: the field is where add_to_index() will store embeddings."""
    index = fob.compute_similarity(
        dataset, embeddings_field="new_emb", embeddings=False, brain_key="sim", backend=backend
    )
    assert index.total_index_size == 0
    ids = dataset.values("id")
    index.add_to_index(vectors, ids)
    assert dataset.count("new_emb") == NUM
    assert np.allclose(np.stack(dataset.values("new_emb")), vectors, atol=1e-5)
    loaded = dataset.load_brain_results("sim", cache=False)
    assert loaded.sort_by_similarity(ids[4], k=1).values("id") == [ids[4]]


def test_reload_in_a_new_process(dataset, vectors, backend):
    _build(dataset, backend)
    ids = dataset.values("id")
    expected = dataset.sort_by_similarity(ids[2], k=5, brain_key="sim").values("id")
    dataset.persistent = True
    try:
        script = textwrap.dedent(
            """
            import fiftyone as fo
            import dinoprop
            dataset = fo.load_dataset(%r)
            print(dataset.sort_by_similarity(%r, k=5, brain_key="sim").values("id"))
            """
            % (dataset.name, ids[2])
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.splitlines()
    finally:
        dataset.persistent = False
    assert out[-1] == str(expected)
