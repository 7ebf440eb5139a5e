"""The faiss similarity backend: a real FiftyOne Brain similarity run."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import fiftyone as fo
import fiftyone.brain as fob

import dinoprop as dp
from dinoprop.core import DinopropError, l2_normalize
from dinoprop.similarity import DinopropSimilarityIndex

from conftest import REPO_ROOT


def _exact_order(dataset, query_vector, field="dinoprop_embedding"):
    ids, vectors = dataset.values(["id", field])
    x = l2_normalize(np.stack(vectors))
    q = query_vector / np.linalg.norm(query_vector)
    sims = x @ q
    return [ids[i] for i in np.argsort(-sims, kind="stable")], np.sort(sims)[::-1]


@pytest.fixture
def vector_dataset():
    """A dataset of 600 clustered 24-d vectors (no media needed)."""
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(6, 24)) * 2
    x = centers[rng.integers(0, 6, 600)] + rng.normal(size=(600, 24))
    dataset = fo.Dataset()
    dataset.add_samples(
        [
            fo.Sample(filepath="/tmp/v%04d.jpg" % i, dinoprop_embedding=v)
            for i, v in enumerate(x.astype(np.float32))
        ]
    )
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def test_index_sorts_like_exact_search(embedded_dataset):
    index = dp.compute_similarity(embedded_dataset)
    summary = index.summary()
    assert isinstance(index, DinopropSimilarityIndex)
    assert summary["index_type"] == "flat"
    assert summary["index_size"] == len(embedded_dataset)
    assert summary["dim"] == 16 and summary["metric"] == "cosine"
    json.dumps(summary)
    assert os.path.exists(index.index_path)

    query = embedded_dataset.skip(5).first()
    view = embedded_dataset.sort_by_similarity(
        query.id, k=6, brain_key="dinoprop_similarity", dist_field="dist"
    )
    expected, sims = _exact_order(embedded_dataset, query.dinoprop_embedding)
    assert view.values("id") == expected[:6]
    assert np.allclose(view.values("dist"), 1 - sims[:6], atol=1e-5)


def test_app_stage_by_id_by_vector_and_least_similar(embedded_dataset):
    dp.compute_similarity(embedded_dataset, brain_key="sim")
    query = embedded_dataset.first()
    expected, _ = _exact_order(embedded_dataset, query.dinoprop_embedding)

    stage = fo.SortBySimilarity(query.id, k=4, brain_key="sim")
    assert embedded_dataset.add_stage(stage).values("id") == expected[:4]

    vector = np.asarray(query.dinoprop_embedding)
    by_vector = embedded_dataset.sort_by_similarity(vector, k=4, brain_key="sim")
    assert by_vector.values("id") == expected[:4]

    least = embedded_dataset.sort_by_similarity(
        query.id, k=3, reverse=True, brain_key="sim"
    )
    assert least.values("id") == expected[::-1][:3]

    # Restricting to a view (what the App does with a filtered grid)
    half = embedded_dataset.take(10, seed=1)
    in_view = half.sort_by_similarity(query.id, k=3, brain_key="sim")
    in_half = set(half.values("id"))
    assert in_view.values("id") == [i for i in expected if i in in_half][:3]


def test_fob_backend_name_works(embedded_dataset):
    index = fob.compute_similarity(
        embedded_dataset,
        embeddings="dinoprop_embedding",
        backend="dinoprop",
        brain_key="via_fob",
    )
    assert isinstance(index, DinopropSimilarityIndex)
    info = embedded_dataset.get_brain_info("via_fob")
    assert info.config.method == "dinoprop"
    assert index.total_index_size == len(embedded_dataset)


def test_round_trip_in_a_new_process(embedded_dataset):
    embedded_dataset.persistent = True
    index = dp.compute_similarity(embedded_dataset, brain_key="trip")
    # an update made here must be what the other process sees
    index.remove_from_index(sample_ids=embedded_dataset.skip(22).values("id"))
    assert index.total_index_size == 22
    query = embedded_dataset.first().id
    expected = embedded_dataset.sort_by_similarity(
        query, k=5, brain_key="trip"
    ).values("id")
    script = (
        "import json, sys, fiftyone as fo\n"
        "ds = fo.load_dataset(sys.argv[1])\n"
        "r = ds.load_brain_results('trip')\n"
        "v = ds.add_stage(fo.SortBySimilarity(sys.argv[2], k=5, brain_key='trip'))\n"
        "print(json.dumps([type(r).__name__, r.summary(), v.values('id')]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, embedded_dataset.name, query],
        capture_output=True,
        text=True,
        cwd=str(REPO_ROOT),
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    name, summary, ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert name == "DinopropSimilarityIndex"
    assert summary["index_size"] == 22
    assert ids == expected
    assert "rebuilding" not in out.stderr


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_file_is_rebuilt(embedded_dataset, caplog, damage):
    index = dp.compute_similarity(embedded_dataset, brain_key="dmg")
    path = index.index_path
    if damage == "missing":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.seek(200)
            f.write(b"garbage" * 20)
    with caplog.at_level(logging.WARNING):
        loaded = embedded_dataset.load_brain_results("dmg", cache=False)
    assert "rebuilding" in caplog.text
    assert loaded.total_index_size == len(embedded_dataset)
    assert os.path.exists(path)
    query = embedded_dataset.first()
    expected, _ = _exact_order(embedded_dataset, query.dinoprop_embedding)
    assert loaded.sort_by_similarity(query.id, k=3).values("id") == expected[:3]


def test_interrupted_write_keeps_the_old_index(embedded_dataset, monkeypatch):
    index = dp.compute_similarity(embedded_dataset, brain_key="crash")
    before = open(index.index_path, "rb").read()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(OSError):
        index.remove_from_index(sample_ids=[embedded_dataset.first().id])
    monkeypatch.undo()
    assert open(index.index_path, "rb").read() == before
    leftovers = [
        f for f in os.listdir(os.path.dirname(index.index_path)) if ".tmp-" in f
    ]
    assert leftovers == []


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_add_remove_matches_exact_search(vector_dataset, index_type):
    index = dp.compute_similarity(
        vector_dataset, brain_key="upd", index_type=index_type
    )
    assert index.index_type == index_type
    ids = np.array(vector_dataset.values("id"))
    removed = list(ids[:100])
    index.remove_from_index(sample_ids=removed)
    rng = np.random.default_rng(9)
    new_vectors = rng.normal(size=(50, 24)).astype(np.float32) * 2
    new_samples = [
        fo.Sample(filepath="/tmp/new%02d.jpg" % i) for i in range(50)
    ]
    new_ids = vector_dataset.add_samples(new_samples)
    index.add_to_index(new_vectors, new_ids)
    assert index.total_index_size == 600 - 100 + 50
    assert not set(removed) & set(index.sample_ids)

    # the field follows the index (embeddings_field is kept in sync)
    assert vector_dataset.exists("dinoprop_embedding").count() == 550

    vectors, sample_ids, _ = index.get_embeddings()
    x = l2_normalize(vectors)
    queries = x[rng.choice(len(x), 40, replace=False)]
    found, _, _ = index._kneighbors(query=queries, k=10, return_dists=True)
    exact = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    recall = np.mean(
        [
            len(set(f) & set(sample_ids[e])) / 10.0
            for f, e in zip(found, exact)
        ]
    )
    if index_type == "flat":
        assert recall == 1.0
    else:
        assert recall >= 0.95
    assert not set(removed) & {i for f in found for i in f}


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_the_ivf_graph_searched_list_by_list_equals_faiss_search(vector_dataset, monkeypatch, metric):
    from dinoprop import graph

    index = dp.compute_similarity(
        vector_dataset, brain_key="lbl", index_type="ivf", exact_threshold=0, metric=metric
    )
    graphs = {}
    for name, min_queries in (("faiss", 10**9), ("list by list", 1)):
        monkeypatch.setattr(graph, "LIST_BY_LIST_MIN_QUERIES", min_queries)
        monkeypatch.setattr(graph, "LIST_BY_LIST_MIN_DIM", 1)
        calls = []
        by_list = graph.search_list_by_list
        monkeypatch.setattr(
            graph, "search_list_by_list", lambda *a: calls.append(1) or by_list(*a)
        )
        index._graph = None
        graphs[name] = index.knn(8)
        assert len(calls) == (name == "list by list")
        monkeypatch.undo()
    assert (graphs["faiss"][0] == graphs["list by list"][0]).mean() > 0.999
    assert np.allclose(graphs["faiss"][1], graphs["list by list"][1], atol=1e-5)


def test_deleted_samples_are_dropped_when_loading(vector_dataset):
    dp.compute_similarity(vector_dataset, brain_key="del", index_type="ivf")
    gone = vector_dataset.take(50, seed=2)
    gone_ids = set(gone.values("id"))
    vector_dataset.delete_samples(gone)
    loaded = vector_dataset.load_brain_results("del", cache=False)
    assert loaded.total_index_size == 550
    query = vector_dataset.first()
    view = vector_dataset.sort_by_similarity(query.id, k=20, brain_key="del")
    assert len(view) == 20 and not gone_ids & set(view.values("id"))


def test_euclidean_metric_and_duplicates(embedded_dataset):
    first = embedded_dataset.first()
    twin = embedded_dataset.skip(1).first()
    twin.dinoprop_embedding = first.dinoprop_embedding
    twin.save()
    index = dp.compute_similarity(
        embedded_dataset, brain_key="euc", metric="euclidean"
    )
    vectors = np.stack(embedded_dataset.values("dinoprop_embedding"))
    ids = embedded_dataset.values("id")
    dists = np.linalg.norm(vectors - vectors[0], axis=1)
    view = embedded_dataset.sort_by_similarity(
        first.id, k=5, brain_key="euc", dist_field="d"
    )
    assert set(view.values("id")[:2]) == {first.id, twin.id}
    assert np.allclose(sorted(view.values("d")), np.sort(dists)[:5], atol=1e-4)
    assert view.values("id")[2:] == [ids[i] for i in np.argsort(dists)[2:5]]

    index.find_duplicates(thresh=1e-3)
    assert index.duplicate_ids == [twin.id] or index.duplicate_ids == [first.id]


def test_patch_embeddings(image_dataset):
    rng = np.random.default_rng(4)
    for sample in image_dataset:
        sample["boxes"] = fo.Detections(
            detections=[
                fo.Detection(
                    label="thing",
                    bounding_box=[0.1, 0.1, 0.3, 0.3],
                    dinoprop_embedding=rng.normal(size=8),
                )
                for _ in range(2)
            ]
        )
        sample.save()
    index = dp.compute_similarity(
        image_dataset, brain_key="patch", patches_field="boxes"
    )
    assert index.total_index_size == 2 * len(image_dataset)
    assert len(index.label_ids) == index.total_index_size
    patches = image_dataset.to_patches("boxes")
    query = patches.first().id
    ranked = patches.sort_by_similarity(query, k=3, brain_key="patch")
    assert ranked.values("id")[0] == query and len(ranked) == 3
    vectors, _, label_ids = index.get_embeddings(label_ids=[query])
    assert vectors.shape == (1, 8) and list(label_ids) == [query]


def test_bad_input_raises_one_clear_error(embedded_dataset):
    runs = embedded_dataset.list_brain_runs()
    with pytest.raises(DinopropError, match="does not exist"):
        dp.compute_similarity(embedded_dataset, embeddings="nope")
    with pytest.raises(DinopropError, match="metric"):
        dp.compute_similarity(embedded_dataset, metric="manhattan")
    with pytest.raises(DinopropError, match="index_type"):
        dp.compute_similarity(embedded_dataset, index_type="lsh")
    for threshold in ("abc", -1):
        with pytest.raises(DinopropError, match="exact_threshold"):
            dp.compute_similarity(embedded_dataset, exact_threshold=threshold)
    with pytest.raises(DinopropError, match="empty"):
        dp.compute_similarity(embedded_dataset.limit(0))
    with pytest.raises(DinopropError):
        dp.compute_similarity(embedded_dataset, embeddings="ground_truth")
    assert embedded_dataset.list_brain_runs() == runs

    # Mixed dimensions: one clear error, and no run left behind
    sample = embedded_dataset.first()
    sample.dinoprop_embedding = np.ones(5)
    sample.save()
    with pytest.raises(DinopropError, match="dimension"):
        dp.compute_similarity(embedded_dataset, brain_key="mixed")
    assert "mixed" not in embedded_dataset.list_brain_runs()


def test_bad_queries_raise(embedded_dataset):
    index = dp.compute_similarity(embedded_dataset, brain_key="q")
    with pytest.raises(DinopropError, match="dimension"):
        index.sort_by_similarity(np.ones(7))
    with pytest.raises(DinopropError, match="not in similarity index"):
        index.sort_by_similarity("0123456789abcdef01234567")
    for k in (0, -3, 2.5):
        with pytest.raises(DinopropError, match="k must be a positive integer"):
            index.sort_by_similarity(embedded_dataset.first().id, k=k)
    first = embedded_dataset.first()
    before = first.dinoprop_embedding.copy()
    with pytest.raises(DinopropError, match="dimension"):
        index.add_to_index(np.ones((1, 3)), [first.id])
    with pytest.raises(DinopropError, match="NaN"):
        index.add_to_index(np.full((1, len(before)), np.nan), [first.id])
    with pytest.raises(DinopropError, match="not in dataset"):
        index.add_to_index(np.ones((1, len(before))), ["0123456789abcdef01234567"])
    # nothing was written: the field and the index still hold the old vector
    first.reload()
    assert np.array_equal(first.dinoprop_embedding, before)
    assert index.total_index_size == len(embedded_dataset)


def test_failed_rebuild_keeps_the_working_index(embedded_dataset):
    index = dp.compute_similarity(embedded_dataset, brain_key="good")
    path = index.index_path
    sample = embedded_dataset.first()
    sample.dinoprop_embedding = np.full(len(sample.dinoprop_embedding), np.nan)
    sample.save()
    with pytest.raises(DinopropError, match="NaN"):
        dp.compute_similarity(embedded_dataset, brain_key="good")
    assert embedded_dataset.list_brain_runs() == ["good"] and os.path.exists(path)

    # a successful rebuild replaces it under the same key, old file removed
    sample.dinoprop_embedding = np.ones(len(sample.dinoprop_embedding))
    sample.save()
    rebuilt = dp.compute_similarity(embedded_dataset, brain_key="good")
    assert rebuilt.key == "good" and embedded_dataset.list_brain_runs() == ["good"]
    assert rebuilt.index_path != path and not os.path.exists(path)
    assert embedded_dataset.load_brain_results("good").total_index_size == len(embedded_dataset)


def test_delete_run_removes_the_file(embedded_dataset):
    index = dp.compute_similarity(embedded_dataset, brain_key="gone")
    path = index.index_path
    embedded_dataset.delete_brain_run("gone")
    assert not os.path.exists(path)


def test_samples_deleted_while_loaded_are_never_returned(vector_dataset):
    index = dp.compute_similarity(vector_dataset, brain_key="live")
    query = vector_dataset.first()
    neighbours = vector_dataset.sort_by_similarity(
        query.id, k=10, brain_key="live"
    ).values("id")
    vector_dataset.delete_samples(neighbours[1:6])
    view = vector_dataset.sort_by_similarity(query.id, k=10, brain_key="live")
    assert len(view) == 10
    assert not set(neighbours[1:6]) & set(view.values("id"))
    assert index.total_index_size == 595


def test_concurrent_writers_leave_a_valid_index(embedded_dataset, caplog):
    import threading

    index = dp.compute_similarity(embedded_dataset, brain_key="race")
    other = embedded_dataset.load_brain_results("race", cache=False)
    other.remove_from_index(sample_ids=[embedded_dataset.first().id])
    errors = []

    def write(results):
        try:
            for _ in range(5):
                results._write_file()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(r,)) for r in (index, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with caplog.at_level(logging.WARNING):
        loaded = DinopropSimilarityIndex(
            embedded_dataset,
            embedded_dataset.get_brain_info("race").config,
            "race",
            load=True,
        )
    # one writer's complete state, not a mix: its checksum verified
    assert "rebuilding" not in caplog.text
    assert loaded.total_index_size == len(embedded_dataset) - 1


def test_app_server_sort_route_uses_the_index(embedded_dataset):
    """The view the App server builds for its "sort by similarity" button."""
    import fiftyone.server.view as fosv

    dp.compute_similarity(embedded_dataset, brain_key="app")
    query = embedded_dataset.skip(3).first()
    expected, _ = _exact_order(embedded_dataset, query.dinoprop_embedding)
    view = fosv.get_view(
        embedded_dataset.name,
        extended_stages={
            "fiftyone.core.stages.SortBySimilarity": {
                "query": [query.id],
                "k": 5,
                "brain_key": "app",
                "reverse": False,
            }
        },
    )
    assert view.values("id") == expected[:5]


def test_updates_without_reload_still_answer_correctly(embedded_dataset):
    index = dp.compute_similarity(embedded_dataset, brain_key="noreload")
    first = embedded_dataset.first()
    vector = np.array(first.dinoprop_embedding)
    index.current_sample_ids  # FiftyOne Brain caches the view state here
    index.remove_from_index(sample_ids=[first.id], reload=False)
    ids, _ = index._kneighbors(query=vector, k=3)
    assert first.id not in ids
    assert set(ids) <= set(index.sample_ids) and len(ids) == 3


def test_empty_view_gives_empty_answers(embedded_dataset):
    index = dp.compute_similarity(embedded_dataset, brain_key="emptyview")
    query = embedded_dataset.first().id
    with index.use_view(embedded_dataset.limit(0)):
        assert index.index_size == 0
        ids, _ = index._kneighbors(query=query, k=5)
        assert ids == []
    empty = embedded_dataset.limit(0)
    assert len(empty.sort_by_similarity(query, k=5, brain_key="emptyview")) == 0


@pytest.mark.parametrize("new_dim", [None, 8])
def test_index_reloaded_after_re_embedding_is_rebuilt(vector_dataset, caplog, new_dim):
    index = dp.compute_similarity(vector_dataset, brain_key="s")
    with caplog.at_level(logging.WARNING, logger="dinoprop.similarity"):
        vector_dataset.load_brain_results("s", cache=False)  # unchanged: no rebuild
    assert "changed since" not in caplog.text
    ids = vector_dataset.values("id")
    rng = np.random.default_rng(7)
    dim = new_dim or len(vector_dataset.first().dinoprop_embedding)
    fresh = rng.normal(size=(len(ids), dim)).astype(np.float32)
    vector_dataset.set_values("dinoprop_embedding", list(fresh))  # e.g. another model
    with caplog.at_level(logging.WARNING, logger="dinoprop.similarity"):
        reloaded = vector_dataset.load_brain_results("s", cache=False)
    assert "changed since similarity index 's' was built" in caplog.text
    assert np.allclose(reloaded.get_embeddings(sample_ids=[ids[0]])[0][0], fresh[0], atol=1e-5)
    order, _ = _exact_order(vector_dataset, fresh[5])
    view = reloaded.sort_by_similarity(fresh[5], k=10)
    assert view.values("id") == order[:10]
    assert index.key == "s"


def test_prune_index_files_removes_only_deleted_datasets(embedded_dataset, vector_dataset):
    from dinoprop.similarity import prune_index_files

    kept = dp.compute_similarity(embedded_dataset, brain_key="kept").index_path
    gone = dp.compute_similarity(vector_dataset, brain_key="gone").index_path
    vector_dataset.delete()  # FiftyOne does not clean up brain runs here
    assert os.path.exists(gone)
    removed = prune_index_files()  # earlier tests' deleted datasets go too
    assert os.path.dirname(gone) in removed and os.path.dirname(kept) not in removed
    assert not os.path.exists(gone) and os.path.exists(kept)
    assert embedded_dataset.load_brain_results("kept", cache=False).total_index_size == 24


def test_a_clone_starts_from_its_source_index(embedded_dataset, caplog):
    dp.compute_similarity(embedded_dataset, brain_key="s")
    clone = embedded_dataset.clone()
    clone.delete_samples(clone.take(4, seed=0))
    try:
        with caplog.at_level(logging.WARNING, logger="dinoprop.similarity"):
            index = clone.load_brain_results("s")
        assert "rebuilding" not in caplog.text  # copied, then synced
        assert index.total_index_size == 20
        assert os.path.dirname(index.index_path).endswith(str(clone._doc.id))
        first = clone.first()
        assert index.sort_by_similarity(first.id, k=1).first().id == first.id
    finally:
        clone.delete()
