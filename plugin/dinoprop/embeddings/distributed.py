"""``compute_embeddings(engine="ray")``: the embedding engine on a Ray cluster.

Open-source FiftyOne runs one operation in one process, so embedding 10M+
images on several GPU machines goes through Ray instead (Ray Data and Ray
Core; no scheduler of our own):

- the driver (the process calling :func:`dinoprop.compute_embeddings`)
  selects the samples still missing vectors, declares the vector field,
  and streams ``(id, filepath)`` blocks into a Ray Dataset;
- Ray Data CPU tasks decode, resize and crop the images (the same
  :class:`~dinoprop.embeddings_data.ImageItems` as the local engine);
- a pool of actors, each holding one model (``num_gpus_per_worker`` GPUs),
  runs the :class:`~dinoprop.embeddings.engine.EmbeddingEngine` and writes
  each batch straight to the dataset's MongoDB as one unordered bulk update
  of ``$set`` operations in FiftyOne's own vector format (idempotent: a
  retried batch writes the same values again);
- the driver counts the written batches on its progress bar and records the
  run once every batch is done.

A killed actor is restarted by Ray and its batch retried; if the whole run
dies, what was written stays, and a rerun embeds only the samples still
missing a vector (the resume rule of the local engine).

Every node needs ``fiftyone-dinoprop[scale]`` installed, the same model
(the actors check its fingerprint against the driver's) and the images at
the same paths, and must reach the dataset's MongoDB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from dinoprop.core import DinopropError
from dinoprop.embeddings.writer import _Runner
from dinoprop.label_writes import write_vectors
from dinoprop.ray_cluster import connect, worker_errors

#: How long the actors may take to start (resources, model downloads)
#: before the run fails.
ACTOR_START_SECONDS = 1800

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DatabaseTarget:
    """Where the actors write: a MongoDB URI, database and collection."""

    uri: str
    database: str
    collection: str


def database_target(dataset: Any) -> DatabaseTarget:
    """The MongoDB the driver's FiftyOne uses, and the dataset's samples.

    ``fo.config.database_uri`` when set (a MongoDB the whole cluster
    shares), else the address of the mongod FiftyOne started here.
    """
    import fiftyone as fo
    import fiftyone.core.odm.database as foodb

    uri = fo.config.database_uri
    if uri is None:
        host, port = foodb.get_db_client().address
        uri = "mongodb://%s:%d/" % (host, port)
    return DatabaseTarget(uri, fo.config.database_name, dataset._sample_collection_name)


def is_loopback_uri(uri: str) -> bool:
    """Whether every host of a ``mongodb://`` URI is this machine."""
    if not uri.startswith("mongodb://"):
        return False  # mongodb+srv:// always names a remote cluster
    netloc = uri[len("mongodb://"):].split("/", 1)[0].rsplit("@", 1)[-1]
    hosts = [
        host[1:].split("]")[0] if host.startswith("[") else host.split(":")[0]
        for host in netloc.split(",")
    ]
    return all(host in _LOOPBACK for host in hosts)


def check_database_reachable(uri: str, ray: Any) -> None:
    """Refuses a MongoDB on localhost when other machines run actors.

    Raises:
        DinopropError: if the URI is a loopback address and the cluster has
            alive nodes at other addresses
    """
    if not is_loopback_uri(uri):
        return
    here = ray.util.get_node_ip_address()
    others = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} - {here})
    if others:
        raise DinopropError(
            "The dataset's MongoDB (%s) is on this machine only, and the Ray "
            "nodes at %s cannot write to it; run a MongoDB that every node "
            "reaches and point FiftyOne at it (FIFTYONE_DATABASE_URI="
            "mongodb://<host>:27017) before loading the dataset"
            % (uri.split("@")[-1], ", ".join(others))
        )


def decode_batch(batch: dict, preprocessing: Any) -> dict:
    """A Ray Data CPU task: image files to uint8 crops, failures kept.

    Args:
        batch: columns ``index``, ``id`` and ``filepath``
        preprocessing: the model's :class:`dinoprop.models.Preprocessing`

    Returns:
        ``index``, ``id``, ``image`` (``N x 3 x S x S`` uint8, zeros where
        decoding failed) and ``error`` ("" or the failure reason)
    """
    from dinoprop.embeddings_data import ArrayImageItems

    items = ArrayImageItems([str(p) for p in batch["filepath"]], preprocessing)
    size = preprocessing.crop_size
    images = np.zeros((len(items), 3, size, size), np.uint8)
    errors = []
    for position in range(len(items)):
        _, array, error = items[position]
        if array is not None:
            images[position] = array
        errors.append(error or "")
    return {"index": batch["index"], "id": batch["id"], "image": images,
            "error": np.array(errors, dtype=object)}


class EmbedAndWrite:
    """A Ray Data actor: one model, embedding decoded batches and writing
    their vectors to the dataset.

    Args:
        model: the model name or path (loaded by this actor)
        load_options: :func:`dinoprop.models.load_model` options
        engine_options: :class:`EmbeddingEngine` options
        fingerprint: the model fingerprint the driver recorded
        target: the :class:`DatabaseTarget`
        path: the vector field
    """

    def __init__(self, model, load_options, engine_options, fingerprint, target, path):
        import ray
        from pymongo import MongoClient

        from dinoprop.embeddings.engine import EmbeddingEngine
        from dinoprop.models import load_model

        context = ray.get_runtime_context()
        self.node, self.worker = context.get_node_id(), context.get_actor_id()
        backbone = load_model(model, **load_options)
        if backbone.fingerprint != fingerprint:
            raise DinopropError(
                "Ray node %s loaded model '%s' with fingerprint %s, but the run "
                "uses %s: every node must have the same model files"
                % (self.node, model, backbone.fingerprint, fingerprint)
            )
        self.engine = EmbeddingEngine(backbone, num_workers=0, **engine_options)
        self.collection = MongoClient(target.uri)[target.database][target.collection]
        self.path = path

    def __call__(self, batch: dict) -> dict:
        """Embeds and writes the decoded images of ``batch``.

        Returns:
            ``index``, ``error``, ``node`` and ``worker`` (this actor's node
            and actor IDs) per row
        """
        import torch

        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
            write_vectors(self.collection, self.path, batch["id"][ok], self.engine.embed_images(images))
        return {"index": batch["index"], "error": errors,
                "node": np.array([self.node] * len(errors), dtype=object),
                "worker": np.array([self.worker] * len(errors), dtype=object)}


def _describe(model: str, load_options: dict, engine_options: dict) -> tuple:
    """A Ray task loading the model as the actors will: its facts and
    preprocessing."""
    from dinoprop.embeddings.engine import EmbeddingEngine
    from dinoprop.models import load_model

    engine = EmbeddingEngine(load_model(model, **load_options), num_workers=0, **engine_options)
    return engine.describe(), engine.model.preprocessing


@dataclass
class WrittenBatch:
    """A batch the actors embedded and wrote.

    Attributes:
        indices: positions (in the driver's pending samples) written
        failures: ``(position, reason)`` of the images that failed
        node: the Ray node ID of the actor that wrote it
        worker: that actor's ID
    """

    indices: list
    failures: list = field(default_factory=list)
    node: str = ""
    worker: str = ""


class RayEngine:
    """The driver's side of a Ray embeddings run.

    Connects to the cluster and loads the model once in a Ray task with the
    actors' resources (for its fingerprint and facts); :meth:`run` then
    streams the pending samples through decode tasks and the actor pool.

    Args:
        model: a model name, Hugging Face id or path every node can load
        load_options: ``image_size``, ``trust_remote_code``, ``compile``,
            ``precision`` of :func:`dinoprop.models.load_model`
        address: the Ray cluster address, or None (see :func:`connect`)
        num_workers: embedding actors; default one per GPU of the cluster
            (``/ num_gpus_per_worker``), else half its CPUs
        num_gpus_per_worker: GPUs per actor (fractions share a GPU);
            default 1 when the cluster has GPUs, else 0
        engine_options: ``batch_size``, ``pooling``, ``normalize``,
            ``flip_average`` of :class:`EmbeddingEngine`
    """

    def __init__(self, model, load_options, address, num_workers, num_gpus_per_worker, engine_options):
        self.ray = connect(address)
        resources = self.ray.cluster_resources()
        self.num_gpus = _gpus_per_worker(num_gpus_per_worker, resources.get("GPU", 0))
        self.num_workers = num_workers or _default_workers(self.num_gpus, resources)
        self.model = model
        # with GPUs, Ray makes the actor's GPU cuda:0; without, stay on the CPU
        self.load_options = {**load_options, "device": None if self.num_gpus else "cpu"}
        describe = self.ray.remote(_describe).options(num_cpus=1, num_gpus=self.num_gpus)
        with worker_errors():
            self._facts, self.preprocessing = self.ray.get(
                describe.remote(model, self.load_options, engine_options)
            )
        self.engine_options = {**engine_options, "batch_size": self._facts["batch_size"]}

    def describe(self) -> dict:
        """The model's facts, as :meth:`EmbeddingEngine.describe` on a worker."""
        return self._facts

    def run(self, sample_ids: list, filepaths: list, target: DatabaseTarget, path: str) -> Iterator[WrittenBatch]:
        """Embeds and writes the given samples; yields each written batch.

        Args:
            sample_ids: the samples to embed
            filepaths: their image paths
            target: where the actors write
            path: the vector field (already declared)

        Yields:
            a :class:`WrittenBatch` per actor batch, in completion order

        Raises:
            DinopropError: an actor's (e.g. a fingerprint mismatch)
        """
        ray = self.ray
        batch_size = self._facts["batch_size"]
        blocks = ray.data.from_arrow(_blocks(sample_ids, filepaths, batch_size))
        decoded = blocks.map_batches(
            decode_batch, fn_kwargs={"preprocessing": self.preprocessing},
            batch_size=batch_size, num_cpus=1,
        )
        written = decoded.map_batches(
            EmbedAndWrite,
            fn_constructor_kwargs={
                "model": self.model, "load_options": self.load_options,
                "engine_options": self.engine_options,
                "fingerprint": self._facts["summary"]["fingerprint"],
                "target": target, "path": path,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=self.num_workers),
            num_cpus=1, num_gpus=self.num_gpus,
            # a killed actor is restarted and its batch retried (explicit,
            # which also keeps decoding in tasks of its own on CPU clusters)
            max_restarts=-1, max_task_retries=-1,
        )
        written.context.enable_progress_bars = False  # the driver shows one
        # work starts once every actor has loaded its model; a cluster that
        # cannot place them all fails after ACTOR_START_SECONDS
        written.context.wait_for_min_actors_s = ACTOR_START_SECONDS
        with worker_errors():
            for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
                yield _written_batch(batch)


def _written_batch(batch: dict) -> WrittenBatch:
    """The :class:`WrittenBatch` of one output block (one actor task)."""
    rows = list(zip(batch["index"].tolist(), batch["error"]))
    return WrittenBatch(
        indices=[index for index, error in rows if not error],
        failures=[(index, str(error)) for index, error in rows if error],
        node=str(batch["node"][0]) if rows else "",
        worker=str(batch["worker"][0]) if rows else "",
    )


def _blocks(sample_ids: list, filepaths: list, batch_size: int) -> list:
    """Arrow tables of ``batch_size`` rows: one decode task each."""
    import pyarrow as pa

    return [
        pa.table({
            "index": np.arange(start, min(start + batch_size, len(sample_ids))),
            "id": sample_ids[start : start + batch_size],
            "filepath": filepaths[start : start + batch_size],
        })
        for start in range(0, len(sample_ids), batch_size)
    ]


def _gpus_per_worker(requested: Optional[float], cluster_gpus: float) -> float:
    if requested is None:
        return 1.0 if cluster_gpus else 0.0
    if isinstance(requested, bool) or not isinstance(requested, (int, float)) or requested < 0:
        raise DinopropError("num_gpus_per_worker must be a number >= 0; got %r" % (requested,))
    if requested > cluster_gpus:
        raise DinopropError(
            "num_gpus_per_worker=%s but the Ray cluster has %s GPUs; pass "
            "num_gpus_per_worker=0 to embed on CPUs" % (requested, cluster_gpus)
        )
    return float(requested)


def _default_workers(num_gpus: float, resources: dict) -> int:
    if num_gpus:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    return max(1, int(resources.get("CPU", 1) // 2))


class RayRunner(_Runner):
    """The embeddings loop of :func:`compute_embeddings` with the Ray engine:
    same pending selection and field declaration as the local loop, but the
    actors write; the driver counts, reports failures and shows progress."""

    def _run(self, filepaths, boxes, sample_ids, progress, path, keys, labels):
        import fiftyone.core.sample as fos

        from dinoprop.core import progress_bar

        target = database_target(self.dataset)
        check_database_reachable(target.uri, self.engine.ray)
        results = self.results
        with progress_bar(len(filepaths), progress=progress, iters_str="images") as pb:
            try:
                for batch in self.engine.run(sample_ids, filepaths, target, path):
                    results.num_embedded += len(batch.indices)
                    for counts, key in ((results.images_per_node, batch.node),
                                        (results.images_per_worker, batch.worker)):
                        counts[key] = counts.get(key, 0) + len(batch.indices)
                    self._record_failures(batch.failures, sample_ids, filepaths)
                    pb.update(len(batch.indices) + len(batch.failures))
            finally:  # in-memory samples see what the actors wrote
                fos.Sample._reload_docs(self.dataset._sample_collection_name)
