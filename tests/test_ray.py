"""compute_embeddings(engine="ray") on a real Ray cluster of two simulated
nodes (one shared by every test that needs one), writing to the test
session's private mongod, and the kNN graph searched on it
(dinoprop.graph_distributed)."""

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest

import dinoprop as dp
import dinoprop.embeddings as de
from dinoprop import graph, graph_distributed, ray_cluster
from dinoprop.core import DinopropError
from dinoprop.embeddings import distributed
from dinoprop.propagation import propagate_labels
from dinoprop.similarity import sample_knn_graph

from conftest import seeded_dataset

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:  # pragma: no cover - make test installs the scale extra
    pytest.skip(
        "RAY IS NOT INSTALLED: the Ray engine is NOT tested; install it with "
        "pip install 'fiftyone-dinoprop[scale]' (make test does)",
        allow_module_level=True,
    )

LOCAL = "local_embedding"


def _start_checked(**init_args):
    """ray.init, then checks that workers import this checkout's dinoprop."""
    import dinoprop

    ray.init(include_dashboard=False, **init_args)
    where = ray.get(ray.remote(lambda: __import__("dinoprop").__file__).remote())
    assert where == dinoprop.__file__


@pytest.fixture(scope="module")
def two_nodes():
    """A simulated 2-node Ray cluster (``ray.cluster_utils.Cluster``), 2 CPUs
    and one logical GPU per node, shared by every test that needs a cluster
    (starting one costs more than most of them); yields its node IDs.

    Idle workers are kept (not stopped after 1 s), so that a CPU task
    loading the model finds a worker that already imported torch, and Ray's
    usage statistics (one more worker process) are off."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "num_gpus": 1,
            "_system_config": {"idle_worker_killing_time_threshold_ms": 600_000},
        })
        try:
            cluster.add_node(num_cpus=2, num_gpus=1)
            _start_checked(address=cluster.address)
            yield {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        finally:
            ray.shutdown()
            cluster.shutdown()


def _vectors(dataset, field):
    return np.stack(dataset.values(field))


def _cosines(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _modified(dataset):
    return dict(zip(*dataset.values(["id", "last_modified_at"])))


def _clustered(num, dim=48, classes=20, seed=0):
    """``num`` float32 vectors around ``classes`` centres (loose enough that
    the calibrated IVF search misses some exact neighbours), and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, num)
    centers = rng.normal(size=(classes, dim)) * 0.6
    return (centers[labels] + rng.normal(size=(num, dim))).astype(np.float32), labels


@pytest.fixture
def small_approximate_threshold(monkeypatch):
    """Graphs of 1000+ vectors are searched with the IVF index (not 50k+)."""
    monkeypatch.setattr(graph, "APPROXIMATE_MIN_NODES", 1000)


# ------------------------------------------------------- without a cluster


def test_vectors_are_stored_in_fiftyones_format():
    import zlib

    import fiftyone.core.utils as fou

    from dinoprop.label_writes import serialize_vector

    vector = np.random.default_rng(0).normal(size=384).astype(np.float32)
    stored = serialize_vector(vector)
    read = fou.deserialize_numpy_array(stored)
    assert read.dtype == vector.dtype and np.array_equal(read, vector)
    # FiftyOne's own bytes hold the same .npy payload, compressed
    assert zlib.decompress(stored) == zlib.decompress(fou.serialize_numpy_array(vector))


def test_decode_tasks_crop_as_the_local_engine_without_importing_torch(image_items):
    import subprocess
    import sys

    from dinoprop.models import Preprocessing, open_image, preprocess_image

    paths = [path for path, _ in image_items[:3]] + ["/nonexistent.jpg"]
    preprocessing = Preprocessing.for_size(56)
    batch = {"index": np.arange(4), "id": np.array(list("abcd")), "filepath": np.array(paths)}
    decoded = distributed.decode_batch(batch, preprocessing)
    for image, path in zip(decoded["image"], paths[:3]):
        np.testing.assert_array_equal(image, preprocess_image(open_image(path, preprocessing), preprocessing).numpy())
    assert [bool(e) for e in decoded["error"]] == [False] * 3 + [True]
    assert not decoded["image"][3].any()
    code = (
        "import sys, numpy as np\n"
        "from dinoprop.embeddings.distributed import decode_batch\n"
        "from dinoprop.models import Preprocessing\n"
        "out = decode_batch({'index': np.arange(1), 'id': np.array(['a']), "
        "'filepath': np.array([%r])}, Preprocessing.for_size(56))\n"
        "assert out['image'].any() and not out['error'][0]\n"
        "print(sorted({'torch', 'transformers', 'fiftyone'} & set(sys.modules)))\n" % paths[0]
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


@pytest.mark.parametrize("uri, loopback", [
    ("mongodb://localhost:27017/", True),
    ("mongodb://user:pw@127.0.0.1:4242/?authSource=admin", True),
    ("mongodb://[::1]:27017", True),
    ("mongodb://localhost:1,db.example.com:2/", False),
    ("mongodb://10.0.0.5:27017/", False),
    ("mongodb+srv://cluster.example.com/", False),
])
def test_loopback_uris(uri, loopback):
    assert distributed.is_loopback_uri(uri) is loopback


def test_a_local_mongod_is_refused_when_other_machines_run_actors():
    fake_ray = SimpleNamespace(
        util=SimpleNamespace(get_node_ip_address=lambda: "10.0.0.1"),
        nodes=lambda: [{"NodeManagerAddress": "10.0.0.1", "Alive": True},
                       {"NodeManagerAddress": "10.0.0.2", "Alive": True},
                       {"NodeManagerAddress": "10.0.0.3", "Alive": False}],
    )
    with pytest.raises(DinopropError, match=r"10\.0\.0\.2 cannot.*FIFTYONE_DATABASE_URI"):
        distributed.check_database_reachable("mongodb://localhost:27017", fake_ray)
    distributed.check_database_reachable("mongodb://10.0.0.9:27017", fake_ray)


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(DinopropError, match=r"pip install 'fiftyone-dinoprop\[scale\]'"):
        ray_cluster.import_ray()


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "spark"}, "engine must be one of"),
    ({"ray_address": "head:6379"}, "apply to engine='ray' only"),
    ({"engine": "ray", "patches_field": "boxes"}, "does not take patches_field"),
    ({"engine": "ray", "device": "cpu"}, "does not take device"),
    ({"engine": "ray", "num_workers": 0}, "num_workers counts the embedding actors"),
])
def test_ray_arguments_are_checked_before_connecting(image_dataset, kwargs, message):
    import fiftyone as fo

    image_dataset.add_sample_field("boxes", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    ray.shutdown()
    with pytest.raises(DinopropError, match=message):
        de.compute_embeddings(image_dataset, model="dinov2-small", **kwargs)
    assert not ray.is_initialized()


def test_an_unreachable_cluster_is_a_clear_error(image_dataset):
    ray.shutdown()
    with pytest.raises(DinopropError, match="Cannot connect to the Ray cluster at 127.0.0.1:9 .*ray start --head"):
        de.compute_embeddings(image_dataset, model="dinov2-small", engine="ray",
                              ray_address="127.0.0.1:9")


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "spark"}, "engine must be one of"),
    ({"ray_address": "head:6379"}, "apply to engine='ray' only"),
    ({"num_workers": 2}, "apply to engine='ray' only"),
    ({"engine": "ray", "num_workers": 0}, "num_workers must be a positive integer"),
    ({"engine": "ray", "num_workers": 1.5}, "num_workers must be a positive integer"),
])
def test_graph_engine_arguments_are_checked_before_connecting(embedded_dataset, kwargs, message):
    ray.shutdown()
    with pytest.raises(DinopropError, match=message):
        propagate_labels(embedded_dataset, "label", **kwargs)
    with pytest.raises(DinopropError, match=message):
        sample_knn_graph(embedded_dataset, "dinoprop_embedding", 5, **kwargs)
    with pytest.raises(DinopropError, match=message):
        dp.compute_similarity(embedded_dataset, **kwargs)
    with pytest.raises(DinopropError, match="shard_rows must be a positive integer"):
        graph_distributed.ray_graph_search(np.zeros((4, 2)), 2, shard_rows=0)
    assert not ray.is_initialized()
    assert "label_propagated" not in embedded_dataset.get_field_schema()
    assert not embedded_dataset.list_brain_runs()


def test_compute_similarity_on_an_unreachable_cluster_builds_nothing(embedded_dataset):
    ray.shutdown()
    dp.compute_similarity(embedded_dataset, brain_key="kept")
    kept = embedded_dataset.get_brain_info("kept").config.index_id
    with pytest.raises(DinopropError, match="Cannot connect to the Ray cluster at 127.0.0.1:9 "):
        dp.compute_similarity(embedded_dataset, brain_key="kept", engine="ray",
                              ray_address="127.0.0.1:9")
    embedded_dataset.reload()
    assert embedded_dataset.list_brain_runs() == ["kept"]
    assert embedded_dataset.get_brain_info("kept").config.index_id == kept


def test_the_graph_of_objects_is_not_searched_on_ray(image_dataset):
    import fiftyone as fo

    image_dataset.add_sample_field("boxes", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    with pytest.raises(DinopropError, match="graph of objects is searched exactly in this process"):
        propagate_labels(image_dataset, "boxes", engine="ray")


@pytest.mark.parametrize("nodes, workers, cpus", [
    ([2], 1, 2), ([2], 2, 1), ([16, 16], 2, 16), ([3, 5], 4, 1), ([4, 8], 3, 4),
])
def test_graph_workers_reserve_the_most_cpus_that_fit_every_one(nodes, workers, cpus):
    assert graph_distributed._cpus_per_worker(workers, nodes) == cpus


def test_more_graph_workers_than_cpus_is_a_clear_error():
    with pytest.raises(DinopropError, match="num_workers=5 but the Ray cluster has 4 CPUs"):
        graph_distributed._cpus_per_worker(5, [2, 2])


def test_the_graph_on_an_unreachable_cluster_is_a_clear_error(small_approximate_threshold):
    ray.shutdown()
    with pytest.raises(DinopropError, match="Cannot connect to the Ray cluster at 127.0.0.1:9 "):
        graph_distributed.ray_graph_search(_clustered(1200)[0], 10, ray_address="127.0.0.1:9")


def test_a_small_graph_is_searched_exactly_here_without_a_cluster():
    ray.shutdown()
    x = _clustered(300)[0]
    found = graph_distributed.ray_graph_search(x, 5, ray_address="127.0.0.1:9")
    for got, want in zip(found, graph.knn_search(x, 5)):
        np.testing.assert_array_equal(got, want)
    assert not ray.is_initialized()


# ------------------------------- a local 2-node Ray cluster with logical GPUs


def test_the_sharded_graph_equals_the_single_process_graph(two_nodes, small_approximate_threshold):
    x, _ = _clustered(3000)
    neighbors, sims = graph.graph_search(x, 10)
    exact, _ = graph.knn_search(x, 10)
    assert (neighbors != exact).any(axis=1).sum() > 30  # the IVF search ran
    for workers, rows in ((1, graph_distributed.SHARD_ROWS), (2, 700)):  # 1 and 5 shards
        found, found_sims = graph_distributed.ray_graph_search(
            x, 10, num_workers=workers, shard_rows=rows
        )
        np.testing.assert_array_equal(found, neighbors)
        np.testing.assert_allclose(found_sims, sims, atol=1e-6)


def test_propagate_labels_on_ray_equals_the_local_run(two_nodes, small_approximate_threshold):
    import fiftyone as fo

    x, labels = _clustered(1200, classes=4)
    dataset = fo.Dataset()
    try:
        dataset.add_samples([
            fo.Sample(filepath="/nonexistent/%d.jpg" % i, vector=v,
                      truth=fo.Classification(label=str(c)),
                      label=fo.Classification(label=str(c)) if i < 40 else None)
            for i, (v, c) in enumerate(zip(x, labels))
        ])
        graphs = [sample_knn_graph(dataset, "vector", 10, engine=e) for e in ("local", "ray")]
        np.testing.assert_array_equal(graphs[0][2], graphs[1][2])
        local = propagate_labels(dataset, "label", embeddings="vector", output_field="local")
        on_ray = propagate_labels(dataset, "label", embeddings="vector", output_field="on_ray",
                                  engine="ray", num_workers=2)
        assert dataset.values("on_ray.label") == dataset.values("local.label")
        assert on_ray.summary()["estimated_accuracy"] == local.summary()["estimated_accuracy"]

        # a similarity run's graph is reused on Ray only once computed (in
        # one process, the first use computes it: not what engine="ray" is for)
        index = dp.compute_similarity(dataset, embeddings="vector", brain_key="sim")
        assert not index.has_knn(10)
        found = sample_knn_graph(dataset, "vector", 10, engine="ray")
        np.testing.assert_array_equal(found[2], graphs[0][2])
        assert not dataset.load_brain_results("sim").has_knn(10)
        cached = sample_knn_graph(dataset, "vector", 10)  # computes the run's exact graph
        assert dataset.load_brain_results("sim").has_knn(10)
        assert not np.array_equal(cached[2], graphs[0][2])
        np.testing.assert_array_equal(sample_knn_graph(dataset, "vector", 10, engine="ray")[2], cached[2])
    finally:
        dataset.delete()


def test_compute_similarity_on_ray_caches_the_graph_a_local_search_finds(two_nodes, monkeypatch):
    import fiftyone as fo

    x, _ = _clustered(3000)
    dataset = fo.Dataset()
    calls = []
    search = graph_distributed.ShardedSearch.__call__
    monkeypatch.setattr(graph_distributed.ShardedSearch, "__call__",
                        lambda self, *args: calls.append(len(args[1])) or search(self, *args))
    try:
        dataset.add_samples([fo.Sample(filepath="/nonexistent/%d.jpg" % i, vector=v)
                             for i, v in enumerate(x)])
        options = dict(embeddings="vector", index_type="ivf", exact_threshold=0)
        local = dp.compute_similarity(dataset, brain_key="local", **options)
        neighbors, dists = local.knn(12)
        assert calls == []
        dp.compute_similarity(dataset, brain_key="on_ray", engine="ray", num_workers=2,
                              knn_k=12, **options)
        assert calls == [3000]  # every vector searched on the cluster, once
        on_ray = dataset.load_brain_results("on_ray")
        assert on_ray.has_knn(12)  # cached in the index file, with the run
        got, got_dists = on_ray.knn(12)
        exact = np.argsort(-(x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
            x / np.linalg.norm(x, axis=1, keepdims=True)).T, axis=1)[:, 1:13]
        assert (np.sort(neighbors, 1) != np.sort(exact, 1)).any(axis=1).sum() > 30  # IVF, not exact
        np.testing.assert_array_equal(got, neighbors)
        np.testing.assert_allclose(got_dists, dists, atol=1e-5)
        assert calls == [3000]
    finally:
        dataset.delete()


def _kill_one_actor():
    """SIGKILLs one embedding actor's process; returns its pid."""
    import psutil

    for process in psutil.process_iter(["pid", "cmdline"]):
        if "EmbedAndWrite" in " ".join(process.info["cmdline"] or []):
            os.kill(process.info["pid"], signal.SIGKILL)
            return process.info["pid"]
    return None


@pytest.fixture(scope="module")
def ray_runs(two_nodes, image_items):
    """The generated images embedded with the offline backbone (the Ray
    engine is the same for every model; this one loads in a third of a tiny
    transformers model's time, and every actor loads it): in this process
    (``LOCAL``); on the 2-node cluster by the default one actor per GPU, so
    two (``ray``); then, with the vectors of the first 12 samples cleared
    (as if a run had died before writing them), by one CPU actor
    (``num_gpus_per_worker=0``, as on a CPU-only cluster) killed after its
    first batch."""
    import fiftyone as fo

    dataset = seeded_dataset(image_items)
    options = {"model": "efficientnet-lite0", "batch_size": 4}
    de.compute_embeddings(dataset, num_workers=0, embeddings_field=LOCAL, **options)
    two_actors = de.compute_embeddings(dataset, engine="ray", embeddings_field="ray", **options)
    stored = _vectors(dataset, "ray")
    cleared = dataset.values("id")[:12]  # three batches of 4
    dataset.select(cleared).set_field("ray", None).save()
    before_rerun = _modified(dataset)
    killed = []

    def kill_after_first_batch(pb):
        if not killed:
            killed.append(_kill_one_actor())

    one_cpu_actor = {**options, "engine": "ray", "num_workers": 1, "num_gpus_per_worker": 0,
                     "embeddings_field": "ray"}
    rerun = de.compute_embeddings(dataset, progress=kill_after_first_batch, **one_cpu_actor)
    yield SimpleNamespace(
        dataset=dataset, nodes=two_nodes, two_actors=two_actors, stored=stored,
        cleared=cleared, before_rerun=before_rerun, killed=killed, rerun=rerun,
        one_cpu_actor=one_cpu_actor,
    )
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def test_two_nodes_with_a_gpu_each_run_one_actor_each_with_the_local_vectors(ray_runs):
    dataset, run = ray_runs.dataset, ray_runs.two_actors
    assert len(ray_runs.nodes) == 2
    assert (run.engine, run.num_embedded, run.num_failed) == ("ray", 24, 0)
    assert sum(run.images_per_node.values()) == 24
    assert set(run.images_per_node) == ray_runs.nodes  # one actor on each node
    assert len(run.images_per_worker) == 2
    assert _cosines(ray_runs.stored, _vectors(dataset, LOCAL)).min() >= 0.9999
    assert run.fingerprint == de.get_embeddings_run(dataset, LOCAL)["fingerprint"]


def test_a_killed_actor_loses_nothing_and_a_rerun_embeds_only_what_is_missing(ray_runs):
    dataset, rerun = ray_runs.dataset, ray_runs.rerun
    assert ray_runs.killed and ray_runs.killed[0] is not None  # an actor was really killed mid-run
    assert (rerun.num_embedded, rerun.num_skipped, rerun.num_failed) == (12, 12, 0)
    assert len(rerun.images_per_worker) == 1
    assert de.get_embeddings_run(dataset, "ray")["status"] == "completed"
    assert len(dataset) == dataset.count("ray") == 24
    assert len(set(dataset.values("id"))) == 24
    after = _modified(dataset)
    assert [i for i in after if after[i] != ray_runs.before_rerun[i]] == ray_runs.cleared
    # one CPU actor (its batches retried after the kill) wrote what two GPU actors wrote
    np.testing.assert_array_equal(_vectors(dataset, "ray"), ray_runs.stored)

    again = de.compute_embeddings(dataset, **ray_runs.one_cpu_actor)
    assert (again.num_embedded, again.num_skipped) == (0, 24)
    assert _modified(dataset) == after
