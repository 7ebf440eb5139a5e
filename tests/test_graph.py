"""The shared kNN graph: exact on small data, cached with the index, reused."""

import numpy as np
import pytest

import dinoprop as dp
import dinoprop.graph as graph
from dinoprop.core import l2_normalize
from dinoprop.similarity import sample_knn_graph

from conftest import random_embeddings


def test_graph_imports_neither_fiftyone_nor_similarity():
    import subprocess
    import sys

    script = (
        "import sys, dinoprop.graph; "
        "print(sorted(m for m in sys.modules if m == 'fiftyone' "
        "or m.startswith('dinoprop.similarity')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def _exact_neighbors(x, k):
    x = l2_normalize(x)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, 1)


def test_knn_search_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    neighbors, sims = graph.knn_search(x, 5)
    expected, expected_sims = _exact_neighbors(x, 5)
    assert np.allclose(sims, expected_sims, atol=1e-5)
    assert (neighbors == expected).mean() > 0.99  # ties may swap


def test_approximate_knn_search_reaches_its_recall():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(20, 32)) * 2
    x = (centers[rng.integers(0, 20, 3000)] + rng.normal(size=(3000, 32)))
    neighbors, sims = graph.approximate_knn_search(x.astype(np.float32), 10)
    exact, exact_sims = _exact_neighbors(x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(neighbors, exact)])
    assert recall >= 0.95
    assert (neighbors != np.arange(3000)[:, None]).all()  # self excluded
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # best first
    found = np.take_along_axis(l2_normalize(x) @ l2_normalize(x).T, neighbors, 1)
    assert np.allclose(sims, found, atol=1e-5)


def test_list_by_list_search_finds_what_the_index_search_finds():
    import faiss

    rng = np.random.default_rng(2)
    x = graph.unit_vectors(rng.normal(size=(4000, 24)).astype(np.float32))
    index = graph.ivf_index(x, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    # probing fewer lists than a query needs leaves some rows short (-1)
    for nprobe, k in [(4, 11), (1, 80)]:
        sims, nbrs = index.search(x, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        found_sims, found = graph.search_list_by_list(index, x, k, nprobe)
        assert found.dtype == np.int64 and found_sims.dtype == np.float32
        assert ((nbrs < 0) == (found < 0)).all()
        assert (found == nbrs).mean() > 0.999  # equal similarities may swap
        filled = nbrs >= 0
        assert np.allclose(found_sims[filled], sims[filled], atol=1e-5)
    assert (nbrs < 0).any()


def test_large_query_sets_are_searched_list_by_list(monkeypatch):
    calls = []
    rng = np.random.default_rng(3)
    for dim, searched in [(8, False), (64, True)]:
        x = graph.unit_vectors(rng.normal(size=(2000, dim)).astype(np.float32))
        index, nprobe = graph.graph_index(x, 5)
        monkeypatch.setattr(graph, "search_list_by_list", lambda *a: calls.append(a) or a)
        monkeypatch.setattr(graph, "LIST_BY_LIST_MIN_QUERIES", 100)
        graph.search_ivf(index, x[:99], 6, nprobe)
        assert not calls  # small sets: faiss's own search
        graph.search_ivf(index, x, 6, nprobe)
        assert len(calls) == searched  # few dimensions: faiss's own search
        monkeypatch.undo()


def test_index_graph_equals_exact_knn(embedded_dataset):
    index = dp.compute_similarity(embedded_dataset, brain_key="g")
    vectors, _, _ = index.get_embeddings()
    neighbors, dists = index.knn(4)
    exact, sims = _exact_neighbors(vectors, 4)
    assert np.array_equal(neighbors, exact)
    assert np.allclose(dists, 1.0 - sims, atol=1e-5)

    csr = index.knn_graph(4)
    assert csr.shape == (len(vectors), len(vectors))
    assert (csr.getnnz(axis=1) == 4).all()
    expected = graph.neighbors_to_csr(exact, 1.0 - sims)
    assert np.allclose(csr.toarray(), expected.toarray(), atol=1e-5)


def test_graph_is_cached_with_the_run_and_invalidated_by_changes(
    embedded_dataset, monkeypatch
):
    index = dp.compute_similarity(embedded_dataset, brain_key="g")
    first = index.knn(3)
    reloaded = embedded_dataset.load_brain_results("g", cache=False)

    def no_search(*args, **kwargs):
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(reloaded, "_search_rows", no_search)
    again = reloaded.knn(3)
    assert np.array_equal(first[0], again[0])
    monkeypatch.undo()

    index.remove_from_index(sample_ids=[embedded_dataset.first().id])
    neighbors, _ = index.knn(3)
    assert neighbors.shape == (len(embedded_dataset) - 1, 3)
    assert neighbors.max() < len(embedded_dataset) - 1


def test_sample_knn_graph_reuses_the_similarity_run(
    embedded_dataset, monkeypatch
):
    exact = sample_knn_graph(embedded_dataset, "dinoprop_embedding", 5)
    dp.compute_similarity(embedded_dataset, brain_key="g")

    def no_search(*args, **kwargs):
        raise AssertionError("sample_knn_graph searched again")

    monkeypatch.setattr(graph, "knn_search", no_search)
    reused = sample_knn_graph(embedded_dataset, "dinoprop_embedding", 5)
    assert np.array_equal(reused[0], exact[0])
    assert np.array_equal(reused[2], exact[2])
    assert np.allclose(reused[3], exact[3], atol=1e-5)

    # A strict subset is not covered by the run's graph: exact search again
    with pytest.raises(AssertionError, match="searched again"):
        sample_knn_graph(embedded_dataset.limit(10), "dinoprop_embedding", 3)


def test_sample_knn_graph_ignores_a_stale_run(embedded_dataset):
    dp.compute_similarity(embedded_dataset, brain_key="g")
    random_embeddings(embedded_dataset, seed=7)  # embeddings recomputed
    ids, x, neighbors, sims = sample_knn_graph(
        embedded_dataset, "dinoprop_embedding", 3
    )
    expected, expected_sims = _exact_neighbors(x, 3)
    assert np.allclose(sims, expected_sims, atol=1e-5)


def test_load_embeddings_matches_fiftyone_and_skips_missing(embedded_dataset):
    from dinoprop.core import DinopropError, load_embeddings

    dataset = embedded_dataset
    missing = dataset.first()
    missing["dinoprop_embedding"] = None
    missing.save()
    ids, vectors = load_embeddings(dataset, "dinoprop_embedding")
    expected = [(i, v) for i, v in zip(*dataset.values(["id", "dinoprop_embedding"])) if v is not None]
    assert list(ids) == [i for i, _ in expected] and missing.id not in ids
    np.testing.assert_array_equal(vectors, np.stack([v for _, v in expected]))
    assert vectors.dtype == np.float32 and vectors.flags.writeable

    # vectors of mixed lengths take FiftyOne's reader and fail clearly
    other = dataset.last()
    other["dinoprop_embedding"] = np.ones(3, np.float32)
    other.save()
    with pytest.raises(DinopropError, match="mixed dimensions"):
        load_embeddings(dataset, "dinoprop_embedding")
    only_missing = dataset.select(missing.id)
    ids, vectors = load_embeddings(only_missing, "dinoprop_embedding", allow_empty=True)
    assert len(ids) == 0 and vectors.shape[0] == 0
    with pytest.raises(DinopropError, match="No sample in the view has an embedding"):
        load_embeddings(only_missing, "dinoprop_embedding")


def _clustered(num, num_classes=8, dim=32, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, num)
    centers = rng.normal(size=(num_classes, dim)) * 1.5
    return (centers[y] + rng.normal(size=(num, dim))).astype(np.float32), y


def test_graph_search_is_exact_below_its_threshold_and_approximate_above(monkeypatch):
    x, _ = _clustered(3000)
    assert len(x) < graph.APPROXIMATE_MIN_NODES
    exact = graph.knn_search(x, 10)
    below = graph.graph_search(x, 10)
    assert np.array_equal(below[0], exact[0])

    def no_exact(*args, **kwargs):
        raise AssertionError("searched exactly")

    monkeypatch.setattr(graph, "APPROXIMATE_MIN_NODES", 2000)
    monkeypatch.setattr(graph, "knn_search", no_exact)
    neighbors, sims = graph.graph_search(x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(neighbors, exact[0])])
    assert 0.95 <= recall < 1.0  # approximate, at the calibrated recall
    assert np.allclose(
        sims, np.take_along_axis(l2_normalize(x) @ l2_normalize(x).T, neighbors, 1),
        atol=1e-5,
    )


def test_propagation_on_the_approximate_graph_is_as_accurate(monkeypatch):
    import fiftyone as fo

    from dinoprop.propagation import samples as propagation_samples

    x, y = _clustered(2400, seed=3)
    rng = np.random.default_rng(0)
    seeds = {int(i) for c in range(8) for i in rng.choice(np.flatnonzero(y == c), 3, replace=False)}
    dataset = fo.Dataset()
    dataset.add_samples([
        fo.Sample(
            filepath="/synthetic/%d.jpg" % i, dinoprop_embedding=x[i],
            label=fo.Classification(label=str(y[i])) if i in seeds else None,
        )
        for i in range(len(x))
    ])
    searches = []
    approximate = graph.approximate_knn_search
    monkeypatch.setattr(
        graph, "approximate_knn_search",
        lambda *a, **kw: searches.append(len(a[0])) or approximate(*a, **kw),
    )
    accuracy = {}
    for field, threshold in (("exact", graph.APPROXIMATE_MIN_NODES), ("approx", 2000)):
        monkeypatch.setattr(graph, "APPROXIMATE_MIN_NODES", threshold)
        monkeypatch.setattr(propagation_samples, "_GRAPH_CACHE", {})
        dp.propagate_labels(dataset, "label", output_field=field)
        predicted = dataset.values(field + ".label")
        accuracy[field] = np.mean(
            [p == str(t) for i, (p, t) in enumerate(zip(predicted, y)) if i not in seeds]
        )
    assert searches == [2400]  # the second run searched approximately
    assert accuracy["exact"] > 0.9
    assert abs(accuracy["approx"] - accuracy["exact"]) <= 0.01, accuracy


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_serialized_faiss_index_is_faiss_own_bytes(kind):
    import faiss

    x = graph.l2_normalize(np.random.default_rng(0).normal(size=(3000, 16))).astype(np.float32)
    index = (
        faiss.IndexFlatIP(16) if kind == "flat"
        else graph.ivf_index(x, faiss.METRIC_INNER_PRODUCT)
    )
    index.add(x)
    data = graph.serialize_faiss_index(index)
    np.testing.assert_array_equal(data, faiss.serialize_index(index))
    assert faiss.deserialize_index(data).ntotal == 3000


def test_row_norms_and_l2_normalize():
    from dinoprop.core import row_norms

    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    x[3] = 0
    np.testing.assert_allclose(row_norms(x), np.linalg.norm(x, axis=1), rtol=1e-6)
    unit = l2_normalize(x)
    assert unit.dtype == np.float32 and not unit[3].any()
    np.testing.assert_allclose(np.linalg.norm(unit[np.arange(50) != 3], axis=1), 1, rtol=1e-6)
