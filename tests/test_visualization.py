"""UMAP/PCA maps stored as FiftyOne Brain visualization runs."""

import os

import numpy as np
import pytest

import fiftyone as fo

import dinoprop as dp
import dinoprop.graph as graph
from dinoprop.core import DinopropError
from dinoprop.visualization import numba_cache_dir


def _same_class_neighbour_rate(points, labels):
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(d, np.inf)
    nearest = d.argmin(axis=1)
    return np.mean(np.array(labels)[nearest] == np.array(labels))


def test_umap_run_is_a_readable_brain_run(embedded_dataset):
    results = dp.compute_visualization(embedded_dataset)
    summary = results.summary()
    assert summary["num_points"] == 24 and summary["num_dims"] == 2
    assert summary["knn_source"] == "faiss search"

    info = embedded_dataset.get_brain_info("dinoprop_umap")
    assert info.config.type == "visualization"
    loaded = embedded_dataset.load_brain_results("dinoprop_umap", cache=False)
    assert loaded.points.shape == (24, 2)
    assert list(loaded.sample_ids) == embedded_dataset.values("id")
    assert np.allclose(loaded.points, results.points)

    # The map keeps the classes apart
    labels = embedded_dataset.values("ground_truth.label")
    assert _same_class_neighbour_rate(loaded.points, labels) >= 0.9

    # What the App's Embeddings panel does with a filtered grid
    subset = embedded_dataset.take(5, seed=0)
    loaded.use_view(subset, allow_missing=True)
    assert loaded.current_points.shape == (5, 2)
    assert set(loaded.current_sample_ids) == set(subset.values("id"))

    # Same seed, same map
    again = dp.compute_visualization(embedded_dataset, brain_key="again")
    assert np.allclose(again.points, results.points)

    # numba's on-disk cache now holds UMAP's compiled kernels
    cached = [
        os.path.join(root, name)
        for root, _, names in os.walk(numba_cache_dir())
        for name in names
    ]
    assert any("umap" in path and path.endswith(".nbi") for path in cached)


def test_3d_and_pca(embedded_dataset):
    umap3 = dp.compute_visualization(embedded_dataset, brain_key="u3", num_dims=3)
    assert umap3.points.shape == (24, 3)
    pca = dp.compute_visualization(
        embedded_dataset, brain_key="p2", method="pca"
    )
    assert pca.points.shape == (24, 2)
    labels = embedded_dataset.values("ground_truth.label")
    assert _same_class_neighbour_rate(pca.points, labels) >= 0.9
    loaded = embedded_dataset.load_brain_results("p2", cache=False)
    assert loaded.summary()["method"] == "pca"


def test_umap_reuses_the_similarity_graph(embedded_dataset, monkeypatch):
    dp.compute_similarity(embedded_dataset)

    def no_search(*args, **kwargs):
        raise AssertionError("UMAP searched for neighbours again")

    monkeypatch.setattr(graph, "knn_search", no_search)
    results = dp.compute_visualization(embedded_dataset, brain_key="shared")
    assert results.summary()["knn_source"] == "similarity index"
    assert results.points.shape == (24, 2)


def test_patch_points(image_dataset):
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(2, 8)) * 3
    for sample in image_dataset:
        sample["boxes"] = fo.Detections(
            detections=[
                fo.Detection(
                    label=str(c),
                    bounding_box=[0.1, 0.1, 0.3, 0.3],
                    dinoprop_embedding=centers[c] + rng.normal(size=8),
                )
                for c in (0, 1)
            ]
        )
        sample.save()
    results = dp.compute_visualization(
        image_dataset, brain_key="patch_map", patches_field="boxes"
    )
    assert results.points.shape == (48, 2)
    loaded = image_dataset.load_brain_results("patch_map", cache=False)
    assert len(loaded.label_ids) == 48
    assert loaded.config.patches_field == "boxes"
    labels = image_dataset.values("boxes.detections.label", unwind=True)
    assert _same_class_neighbour_rate(loaded.points, labels) >= 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="tsne"), "method"),
        (dict(num_dims=4), "num_dims"),
        (dict(k=1), "k must be"),
        (dict(min_dist=-1), "min_dist"),
        (dict(min_dist="far"), "min_dist"),
        (dict(embeddings="nope"), "does not exist"),
        (dict(embeddings="ground_truth"), "cannot hold embeddings"),
        (dict(brain_key="not a key"), "brain_key"),
    ],
)
def test_bad_input_raises_one_clear_error(embedded_dataset, kwargs, match):
    with pytest.raises(DinopropError, match=match):
        dp.compute_visualization(embedded_dataset, **kwargs)
    assert embedded_dataset.list_brain_runs() == []


def test_small_views_record_the_neighbours_umap_used(embedded_dataset):
    results = dp.compute_visualization(embedded_dataset.limit(6), k=50, brain_key="small")
    assert results.config.num_neighbors == 5
    assert embedded_dataset.get_brain_info("small").config.num_neighbors == 5


def test_empty_view_and_tiny_view(embedded_dataset):
    with pytest.raises(DinopropError, match="empty"):
        dp.compute_visualization(embedded_dataset.limit(0))
    with pytest.raises(DinopropError, match="at least 4"):
        dp.compute_visualization(embedded_dataset.limit(3))
    assert embedded_dataset.list_brain_runs() == []


def test_app_embeddings_panel_loads_the_map(embedded_dataset):
    """What the App server's Embeddings panel route returns for the run."""
    from fiftyone.server.routes.embeddings import OnPlotLoad

    dp.compute_visualization(embedded_dataset, brain_key="panel")
    response = OnPlotLoad._post_sync(
        None,
        {
            "datasetName": embedded_dataset.name,
            "brainKey": "panel",
            "view": [],
            "filters": None,
            "labelField": "ground_truth.label",
            "slices": None,
        },
    )
    assert "error" not in response or not response["error"], response
    traces = response["traces"]
    points = [p for trace in traces.values() for p in trace]
    assert len(points) == len(embedded_dataset)
    assert {t for t in traces} == {"red", "green", "blue"}


def test_non_finite_embeddings_are_named_not_mapped(embedded_dataset):
    embedded_dataset.limit(1).set_values("dinoprop_embedding", [np.full(16, np.inf)])
    with pytest.raises(DinopropError, match="1 of the 24 embeddings .* NaN or infinite"):
        dp.compute_visualization(embedded_dataset)
    assert embedded_dataset.list_brain_runs() == []


def test_large_maps_fit_on_a_sample_and_transform_the_rest(embedded_dataset):
    results = dp.compute_visualization(embedded_dataset, max_fit_points=12)
    assert results.points.shape == (24, 2) and np.isfinite(results.points).all()
    assert results.summary()["knn_source"].endswith("fitted on 12 sampled points)")
    info = embedded_dataset.get_brain_info("dinoprop_umap")
    assert info.config.max_fit_points == 12
    labels = embedded_dataset.values("ground_truth.label")
    assert _same_class_neighbour_rate(results.points, labels) >= 0.8
    with pytest.raises(DinopropError, match="max_fit_points"):
        dp.compute_visualization(embedded_dataset, max_fit_points=2)


def test_sample_search_finds_the_nearest_sample_rows():
    from dinoprop.visualization import SampleSearch

    rng = np.random.default_rng(0)
    sample = graph.l2_normalize(rng.normal(size=(3000, 16))).astype(np.float32)
    queries = graph.l2_normalize(rng.normal(size=(500, 16))).astype(np.float32)
    indices, dists = SampleSearch(sample).query(queries, 10)
    exact = np.argsort(-(queries @ sample.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(indices, exact)])
    assert recall >= 0.95 and indices.dtype == np.int32
    np.testing.assert_allclose(
        dists, 1 - np.take_along_axis(queries @ sample.T, indices, axis=1), atol=1e-5
    )


def test_umap_transform_through_the_faiss_search_keeps_clusters():
    """Past UMAP's small-data limit (4,096 rows) transform queries the
    sample index (SampleSearch): transformed points land in their cluster."""
    from dinoprop.visualization import umap_on_sample

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 5000)
    x = (rng.normal(size=(5, 16)) * 4)[labels] + rng.normal(size=(5000, 16))
    points, source = umap_on_sample(x.astype(np.float32), 4200, k=10)
    assert points.shape == (5000, 2) and np.isfinite(points).all()
    assert "4200 sampled" in source
    # each point's class is its 10 nearest map neighbours' majority
    from sklearn.neighbors import KNeighborsClassifier

    fit = KNeighborsClassifier(10).fit(points[:4000], labels[:4000])
    assert fit.score(points[4000:], labels[4000:]) >= 0.95


def test_vectorized_transform_init_matches_umaps_own():
    """Rows with several neighbours, one of strength 1 mid-row, and none."""
    import scipy.sparse
    import umap.umap_

    from dinoprop.umap_transform import init_graph_transform

    rng = np.random.default_rng(0)
    graph = scipy.sparse.random(300, 80, density=0.1, format="csr", random_state=0)
    graph.data = graph.data.astype(np.float32)
    graph[7, graph[7].indices[1]] = 1.0  # exact match: its position, not a mean
    graph[9] = 0
    graph.eliminate_zeros()
    embedding = rng.normal(size=(80, 2)).astype(np.float32)

    ours = init_graph_transform(graph, embedding)
    theirs = umap.umap_.init_graph_transform(graph, embedding)
    assert ours.dtype == np.float32 and np.isnan(ours[9]).all()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours[7], embedding[graph[7].indices[1]])


@pytest.fixture(scope="module")
def fitted_transform():
    """A UMAP fitted on 4,200 sample rows (past its small-data limit, so
    transform queries SampleSearch), the 1,800 other rows, and umap-learn's
    own transform of them."""
    from dinoprop.visualization import SampleSearch, _reducer, _with_self

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 6000)
    x = (rng.normal(size=(5, 16)) * 4)[labels] + rng.normal(size=(6000, 16))
    x = graph.l2_normalize(x).astype(np.float32)
    sample, rest = x[:4200], x[4200:]
    reducer = _reducer(
        2, 51, 10, 0.1,
        (*_with_self(*graph.approximate_knn_search(sample, 9)), SampleSearch(sample)),
    )
    reducer.fit(sample)
    return reducer, rest, reducer.transform(rest)


def test_umap_transform_with_the_vectorized_init_is_umaps_transform(fitted_transform):
    import umap.umap_

    from dinoprop.umap_transform import vectorized_transform_init

    reducer, rest, theirs = fitted_transform
    with vectorized_transform_init():
        ours = reducer.transform(rest)
    np.testing.assert_array_equal(ours, theirs)  # the layout amplifies any rounding
    assert umap.umap_.init_graph_transform.__module__ == "umap.umap_"


def test_the_layout_of_blocks_of_new_points_on_threads_is_umaps_own(
    fitted_transform, monkeypatch
):
    """Each transformed point moves alone, so blocks optimised apart on
    several threads give umap-learn's one-core layout bit for bit."""
    import umap.layouts
    import umap.umap_

    from dinoprop import umap_transform

    reducer, rest, theirs = fitted_transform
    monkeypatch.setattr(umap_transform, "LAYOUT_BLOCK_POINTS", 250)  # 8 blocks, the last short
    blocks = []
    real = umap.umap_.optimize_layout_euclidean

    def counted(head_embedding, *args, **kwargs):
        blocks.append(len(head_embedding))
        return real(head_embedding, *args, **kwargs)

    monkeypatch.setattr(umap.umap_, "optimize_layout_euclidean", counted)
    epoch = umap.layouts._get_optimize_layout_euclidean_single_epoch_fn
    with umap_transform.parallel_transform_layout(threads=3):
        ours = reducer.transform(rest)
    assert blocks == [250] * 7 + [50]
    np.testing.assert_array_equal(ours, theirs)
    assert umap.umap_.optimize_layout_euclidean is counted  # restored after the block
    assert umap.layouts._get_optimize_layout_euclidean_single_epoch_fn is epoch
