"""A faiss similarity backend for FiftyOne Brain.

``dinoprop.compute_similarity()`` creates a regular FiftyOne Brain similarity
run whose config, method and index classes live here, so everything FiftyOne
does with similarity runs works with it: ``dataset.sort_by_similarity()``,
the App's "sort by similarity" (by selected samples or by vector),
``dataset.load_brain_results()`` in any process, duplicates and uniqueness.

Registration: ``import dinoprop`` registers this backend with FiftyOne Brain
under the name ``"dinoprop"`` (see :func:`dinoprop.register_backend`), so
``fob.compute_similarity(..., backend="dinoprop")`` works without editing any
config file. Loading an existing run needs no registration at all: FiftyOne
imports :class:`DinopropSimilarityConfig` by its class path.

Index types (``index_type``):

-   ``"flat"``: exact search; inner product on L2-normalised vectors for the
    cosine metric, squared L2 for the euclidean metric
-   ``"ivf"``: an inverted file (``IndexIVFFlat``); the number of probed lists
    is calibrated when the index is built so that recall@10 against exact
    search is at least :data:`TARGET_RECALL`
-   ``"hnsw"``: a HNSW graph (``IndexHNSWFlat``), calibrated the same way
-   ``"auto"`` (default): ``"flat"`` up to ``exact_threshold`` vectors,
    ``"ivf"`` beyond

Storage: each index is one file,
``<index dir>/<dataset id>/<index id>.npz``, where ``<index dir>`` is
``$DINOPROP_INDEX_DIR`` when set, else a ``dinoprop/indexes`` folder beside
FiftyOne's database directory (``fo.config.database_dir``), by default
``~/.fiftyone/var/lib/dinoprop/indexes``. The file holds the serialized faiss
index, the sample/label IDs of its rows and the cached kNN graph. It is
written to a temporary file and renamed into place while holding a file lock,
so a crash or concurrent writers never leave a half-written index. When the
file is missing or corrupt, the index is rebuilt from the embeddings (with a
warning) and written again. When the embeddings live in a dataset field,
loading the index also drops samples deleted since and adds samples embedded
since.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import uuid
from typing import Any

import numpy as np

import eta.core.utils as etau

import fiftyone as fo
import fiftyone.brain as fob
import fiftyone.core.utils as fou
from fiftyone.brain.similarity import (
    DuplicatesMixin,
    Similarity,
    SimilarityConfig,
    SimilarityIndex,
)
import fiftyone.brain.internal.core.utils as fbu

from dinoprop.core import DinopropError, l2_normalize, progress_bar, read_embeddings
from dinoprop.graph import (
    CALIBRATION_QUERIES,
    ivf_index,
    neighbors_to_csr,
    nprobe_options,
    tune_recall,
)

logger = logging.getLogger(__name__)

#: Indexes up to this many vectors use exact search when ``index_type="auto"``.
EXACT_THRESHOLD = 10000
#: Minimum recall@10 against exact search that approximate indexes are tuned to.
TARGET_RECALL = 0.95
#: Environment variable overriding where index files are stored.
INDEX_DIR_ENV = "DINOPROP_INDEX_DIR"

#: The supported distance metrics (``metric``).
METRICS = ("cosine", "euclidean")
#: The supported index types (``index_type``), described above.
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
#: Stored vectors compared with the embeddings field when an index loads:
#: a change to more than about 2% of the vectors is caught with near
#: certainty (a re-embedding, another model) and the index is rebuilt.
STALE_PROBES = 256
_FILE_VERSION = 1
_COMPACT_FRACTION = 0.3
_QUERY_CHUNK = 1024
_ADD_CHUNK = 20000
#: The ``progress`` argument of the compute_similarity() call in progress
_PROGRESS = contextvars.ContextVar("dinoprop_similarity_progress", default=None)


def index_dir() -> str:
    """Returns the directory under which dinoprop stores its faiss indexes.

    ``$DINOPROP_INDEX_DIR`` when set, else ``dinoprop/indexes`` beside
    ``fo.config.database_dir``.
    """
    root = os.environ.get(INDEX_DIR_ENV)
    if root:
        return root
    parent = os.path.dirname(os.path.abspath(fo.config.database_dir))
    return os.path.join(parent, "dinoprop", "indexes")


def prune_index_files() -> list:
    """Deletes the index files of datasets that no longer exist.

    Deleting a similarity run deletes its index file, but deleting a whole
    dataset (``dataset.delete()``, or a non-persistent dataset going away)
    does not run FiftyOne Brain's cleanup, so its files stay under
    :func:`index_dir`, one folder per dataset. This removes the folders of
    datasets absent from the current FiftyOne database. If several
    databases share one ``$DINOPROP_INDEX_DIR``, run it only with that
    directory pointing at this database's indexes.

    Returns:
        the removed folders
    """
    import shutil

    import fiftyone.core.odm as foo

    root = index_dir()
    if not os.path.isdir(root):
        return []
    existing = {str(d["_id"]) for d in foo.get_db_conn().datasets.find({}, {"_id": 1})}
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path) and _is_object_id(name) and name not in existing:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _is_object_id(name: str) -> bool:
    return len(name) == 24 and all(c in "0123456789abcdef" for c in name)


def compute_similarity(
    samples: Any,
    embeddings: str = "dinoprop_embedding",
    brain_key: str = "dinoprop_similarity",
    index_type: str = "auto",
    metric: str = "cosine",
    patches_field: str | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
    overwrite: bool = True,
    progress: Any = None,
) -> "DinopropSimilarityIndex":
    """Builds a faiss similarity index of the embeddings in a field.

    The index is a FiftyOne Brain similarity run stored under ``brain_key``:
    sort by similarity in the App or with ``dataset.sort_by_similarity(query,
    brain_key=brain_key)``, and reload it with
    ``dataset.load_brain_results(brain_key)``. As with every FiftyOne Brain
    similarity run, the index covers all samples (or patches) of the dataset
    that have an embedding; restrict queries with ``results.use_view(view)``.

    Args:
        samples: a FiftyOne dataset or view
        embeddings: the vector field holding the embeddings (for patches, the
            attribute of each label holding its embedding)
        brain_key: the brain key of the run
        index_type: ``"auto"``, ``"flat"``, ``"ivf"`` or ``"hnsw"``
        metric: ``"cosine"`` or ``"euclidean"``
        patches_field: an optional ``Detections``/``Polylines`` field whose
            labels are indexed instead of the samples
        exact_threshold: the largest index that ``"auto"`` keeps exact
        overwrite: whether to replace an existing run with this brain key
        progress: None (FiftyOne's default), a bool, or a progress callback

    Returns:
        a :class:`DinopropSimilarityIndex`

    Raises:
        DinopropError: if the input is invalid; nothing is written then
    """
    import time

    from dinoprop.core import check_brain_key, validate_samples

    validate_samples(samples, require_images=False)
    _check_options(metric, index_type, exact_threshold)
    replacing = check_brain_key(samples, brain_key, "similarity", overwrite)
    _check_embeddings(samples, embeddings, patches_field)
    dataset = samples._root_dataset
    # an existing run is only replaced once its successor is built
    build_key = _unused_brain_key(dataset, brain_key + "_rebuild") if replacing else brain_key

    start = time.perf_counter()
    token = _PROGRESS.set(progress)
    try:
        results = fob.compute_similarity(
            samples,
            embeddings=embeddings,
            brain_key=build_key,
            patches_field=patches_field,
            backend=DinopropSimilarityConfig,
            metric=metric,
            index_type=index_type,
            exact_threshold=exact_threshold,
            progress=progress,
        )
    except DinopropError:
        if build_key in dataset.list_brain_runs():
            dataset.delete_brain_run(build_key)
        raise
    finally:
        _PROGRESS.reset(token)
    if replacing:
        dataset.delete_brain_run(brain_key)
        dataset.rename_brain_run(build_key, brain_key)
        results = dataset.load_brain_results(brain_key)
    results._seconds = time.perf_counter() - start
    return results


def _unused_brain_key(dataset, base):
    existing = set(dataset.list_brain_runs())
    key, number = base, 1
    while key in existing:
        number += 1
        key = "%s%d" % (base, number)
    return key


def _check_options(metric, index_type, exact_threshold):
    if not isinstance(exact_threshold, (int, np.integer)) or exact_threshold < 0:
        raise DinopropError(
            "exact_threshold must be a non-negative integer; got %r"
            % (exact_threshold,)
        )
    if metric not in METRICS:
        raise DinopropError(
            "Unsupported metric '%s'; use one of %s" % (metric, METRICS)
        )
    if index_type not in INDEX_TYPES:
        raise DinopropError(
            "Unsupported index_type '%s'; use one of %s"
            % (index_type, INDEX_TYPES)
        )


def _check_embeddings(samples, field, patches_field):
    """Raises DinopropError unless ``samples`` has some usable embeddings."""
    from dinoprop.core import no_embeddings_error, require_embeddings_field

    if require_embeddings_field(samples, field, patches_field) == 0:
        raise no_embeddings_error(field)


class DinopropSimilarityConfig(SimilarityConfig):
    """Configuration of the dinoprop faiss similarity backend.

    Args:
        metric: ``"cosine"`` or ``"euclidean"``
        index_type: ``"auto"``, ``"flat"``, ``"ivf"`` or ``"hnsw"``
        exact_threshold: the largest index that ``"auto"`` keeps exact
        index_id: the name of the index file (generated when omitted)
        **kwargs: keyword arguments for
            :class:`fiftyone.brain.similarity.SimilarityConfig`
    """

    def __init__(
        self,
        metric: str = "cosine",
        index_type: str = "auto",
        exact_threshold: int = EXACT_THRESHOLD,
        index_id: str | None = None,
        **kwargs,
    ):
        _check_options(metric, index_type, exact_threshold)
        super().__init__(**kwargs)
        self.metric = metric
        self.index_type = index_type
        self.exact_threshold = int(exact_threshold)
        self.index_id = index_id or uuid.uuid4().hex

    @property
    def method(self):
        return "dinoprop"

    @property
    def max_k(self):
        return None

    @property
    def supports_least_similarity(self):
        return True

    @property
    def supported_aggregations(self):
        return ("mean",)


class DinopropSimilarity(Similarity):
    """The dinoprop similarity factory.

    Args:
        config: a :class:`DinopropSimilarityConfig`
    """

    def ensure_requirements(self):
        import faiss  # noqa: F401

    def initialize(self, samples, brain_key):
        return DinopropSimilarityIndex(
            samples, self.config, brain_key, backend=self
        )

    def cleanup(self, samples, brain_key):
        _remove_index_file(_index_path(samples, self.config))


def _index_path(samples, config):
    dataset_id = str(samples._root_dataset._doc.id)
    return os.path.join(index_dir(), dataset_id, config.index_id + ".npz")


def _remove_index_file(path):
    for p in (path, path + ".lock"):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


class DinopropSimilarityIndex(SimilarityIndex, DuplicatesMixin):
    """A faiss similarity index stored with a FiftyOne Brain run.

    Rows of the faiss index are never renumbered: removed rows are masked
    out of searches and the index is compacted once too many are removed.

    Args:
        samples: the sample collection of the run
        config: the :class:`DinopropSimilarityConfig`
        brain_key: the brain key
        embeddings: a ``num x dim`` array of external embeddings, if any
        sample_ids: a ``num`` array of sample IDs, if any
        label_ids: a ``num`` array of label IDs, if applicable
        backend: a :class:`DinopropSimilarity`
        load: whether to load the index file (True when reloading a run)
    """

    def __init__(
        self,
        samples,
        config,
        brain_key,
        embeddings=None,
        sample_ids=None,
        label_ids=None,
        backend=None,
        load=False,
    ):
        self._dataset = samples._dataset
        self._path = _index_path(samples, config)
        self._seconds = None
        self._reset_state(config)
        SimilarityIndex.__init__(
            self, samples, config, brain_key, backend=backend
        )
        DuplicatesMixin.__init__(self)
        if load and not os.path.exists(self._path):
            self._copy_from_clone_source()
        if load and self._read_file():
            if self._field_changed():
                logger.warning(
                    "The embeddings in '%s' changed since similarity index '%s' "
                    "was built; rebuilding it",
                    config.embeddings_field, brain_key,
                )
                self._rebuild_from(None, None, None)
            else:
                self._sync_with_field()
            return
        if load:
            self._rebuild_from(embeddings, sample_ids, label_ids)
        elif config.embeddings_field is not None:
            vectors, ids, lids = self._field_embeddings()
            if len(vectors):
                self._build(vectors, ids, lids)
                self._write_file()

    # --- state -----------------------------------------------------------

    def _reset_state(self, config):
        self._index = None
        self._dim = None
        self._resolved_type = None
        self._search_param = None
        self._recall = None
        self._row_sample_ids = np.array([], dtype="<U24")
        self._row_label_ids = (
            np.array([], dtype="<U24")
            if config.patches_field is not None
            else None
        )
        self._row_norms = np.array([], dtype=np.float32)
        self._alive = np.array([], dtype=bool)
        self._graph = None  # (k, neighbors, distances) over alive rows
        self._changed()

    def _changed(self):
        """Drops everything derived from the rows after they change."""
        self._alive_rows = np.flatnonzero(self._alive)
        self._id_to_row = None
        self._view_rows = None
        self._graph = None
        # FiftyOne Brain's view state is re-derived on next use
        self._curr_sample_ids = None
        self._curr_label_ids = None
        self._curr_keep_inds = None
        self._curr_missing_size = None

    @property
    def is_external(self):
        return self.config.embeddings_field is None

    @property
    def sample_ids(self):
        return self._row_sample_ids[self._alive_rows]

    @property
    def label_ids(self):
        if self._row_label_ids is None:
            return None
        return self._row_label_ids[self._alive_rows]

    @property
    def total_index_size(self):
        return int(self._alive_rows.size)

    @property
    def dim(self) -> int | None:
        """The dimension of the indexed vectors (None while empty)."""
        return self._dim

    @property
    def index_type(self) -> str | None:
        """The faiss index type in use: ``"flat"``, ``"ivf"`` or ``"hnsw"``."""
        return self._resolved_type

    @property
    def index_path(self) -> str:
        """The file in which the index is stored."""
        return self._path

    def summary(self) -> dict:
        """A JSON-serialisable description of the index."""
        return {
            "brain_key": self.key,
            "index_type": self._resolved_type,
            "index_size": self.total_index_size,
            "dim": self._dim,
            "metric": self.config.metric,
            "expected_recall_at_10": (
                1.0 if self._resolved_type == "flat" else self._recall
            ),
            "seconds": None if self._seconds is None else round(self._seconds, 3),
        }

    # --- building --------------------------------------------------------

    def _prepare(self, vectors):
        x = self._checked(vectors)
        norms = np.linalg.norm(x, axis=1).astype(np.float32)
        if self.config.metric == "cosine":
            x = np.ascontiguousarray(l2_normalize(x), dtype=np.float32)
        return x, norms

    def _checked(self, vectors):
        """``vectors`` as a float32 array, if they can join this index."""
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2:
            raise DinopropError("Embeddings must be a 2-D array")
        if not np.isfinite(x).all():
            raise DinopropError("Embeddings contain NaN or infinite values")
        if self._dim is not None and x.shape[1] != self._dim:
            raise DinopropError(
                "Embedding dimension %d does not match the index dimension "
                "%d; recompute the index with compute_similarity()"
                % (x.shape[1], self._dim)
            )
        return x

    def _build(self, vectors, sample_ids, label_ids=None):
        """(Re)builds the whole index from the given vectors."""
        import faiss

        self._reset_state(self.config)
        x, norms = self._prepare(vectors)
        num, self._dim = x.shape
        kind = self.config.index_type
        if kind == "auto":
            kind = "flat" if num <= self.config.exact_threshold else "ivf"
        if kind != "flat" and num < 2 * CALIBRATION_QUERIES:
            kind = "flat"
        metric = (
            faiss.METRIC_INNER_PRODUCT
            if self.config.metric == "cosine"
            else faiss.METRIC_L2
        )
        if kind == "flat":
            index = faiss.IndexFlat(self._dim, metric)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(self._dim, 32, metric)
            index.hnsw.efConstruction = 64
        else:
            index = ivf_index(x, metric)
        with progress_bar(num, _PROGRESS.get(), "vectors") as pb:
            for start in range(0, num, _ADD_CHUNK):
                index.add(x[start : start + _ADD_CHUNK])
                pb.update(min(_ADD_CHUNK, num - start))
        if kind == "ivf":
            index.make_direct_map()
        self._index = index
        self._resolved_type = kind
        self._row_sample_ids = np.asarray(sample_ids)
        if self._row_label_ids is not None:
            self._row_label_ids = np.asarray(label_ids)
        self._row_norms = norms
        self._alive = np.ones(num, dtype=bool)
        self._changed()
        if kind != "flat":
            self._calibrate(x)

    def _calibrate(self, x):
        """Picks the cheapest search setting reaching TARGET_RECALL@10."""
        if self._resolved_type == "ivf":
            options = nprobe_options(self._index.nlist)
        else:
            options = [16, 32, 64, 128, 256, 512]

        def search(queries, value):
            self._search_param = value
            return self._index.search(queries, 10, params=self._params(10))[1]

        self._search_param, self._recall = tune_recall(
            x,
            search,
            options,
            lambda q: self._exact_topk(q, 10, np.arange(len(x)))[0],
            TARGET_RECALL + 0.02,
        )

    def _params(self, k, sel=None, fraction=1.0):
        import faiss

        if self._resolved_type == "ivf":
            params = faiss.SearchParametersIVF()
            nprobe = int(np.ceil(self._search_param / max(fraction, 1e-3)))
            params.nprobe = min(nprobe, self._index.nlist)
        elif self._resolved_type == "hnsw":
            params = faiss.SearchParametersHNSW()
            ef = int(np.ceil(self._search_param / max(fraction, 1e-3)))
            params.efSearch = max(ef, k)
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        return params

    def _field_embeddings(self, samples=None):
        samples = self._dataset if samples is None else samples
        return read_embeddings(
            samples,
            self.config.embeddings_field,
            self.config.patches_field,
            allow_empty=True,
        )

    def _rebuild_from(self, embeddings, sample_ids, label_ids):
        if self.config.embeddings_field is not None:
            embeddings, sample_ids, label_ids = self._field_embeddings()
        if embeddings is None or len(embeddings) == 0:
            self._reset_state(self.config)
        else:
            self._build(embeddings, sample_ids, label_ids)
        self._write_file()

    def _copy_from_clone_source(self):
        """Copies the index file of the dataset this one was cloned from.

        A cloned dataset keeps its sample IDs and its brain runs' configs,
        so the source's file (same index ID, another dataset's folder) is a
        valid start; loading then syncs it with this dataset's embeddings.
        """
        import glob
        import shutil

        name = os.path.basename(self._path)
        sources = [
            p for p in glob.glob(os.path.join(index_dir(), "*", name)) if p != self._path
        ]
        if not sources:
            return
        self._replace_file(lambda tmp: shutil.copyfile(sources[0], tmp))
        logger.info("Copied similarity index '%s' from %s", self.key, sources[0])

    def _field_changed(self):
        """Whether randomly probed stored vectors differ from the field's."""
        if self.config.embeddings_field is None or self.total_index_size == 0:
            return False
        patches = self.config.patches_field
        ids = self.label_ids if patches else self.sample_ids
        picked = np.random.default_rng().choice(
            len(ids), min(STALE_PROBES, len(ids)), replace=False
        )
        probe = [str(ids[i]) for i in picked]
        view = (
            self._dataset.select_labels(ids=probe, fields=patches)
            if patches
            else self._dataset.select(probe)
        )
        vectors, sample_ids, label_ids = self._field_embeddings(view)
        id_to_row = self._get_id_to_row()
        rows = [id_to_row[i] for i in (label_ids if patches else sample_ids)]
        stored = self._original_vectors(np.asarray(rows, np.int64))
        return stored.shape != vectors.shape or not np.allclose(
            stored, vectors, rtol=1e-3, atol=1e-4
        )

    def _sync_with_field(self):
        """Drops deleted samples/labels and adds newly embedded ones."""
        if self.config.embeddings_field is None:
            return
        if self.config.patches_field is None:
            field = self.config.embeddings_field
            view = self._dataset.exists(field)
            current = view.values("id")
            have = self.sample_ids
        else:
            _, ids, current = self._field_embeddings()
            have = self.label_ids
        current_set = set(current)
        gone = [i for i in have if i not in current_set]
        have_set = set(have)
        new = [i for i in current if i not in have_set]
        if gone:
            logger.warning(
                "Dropping %d deleted samples/labels from similarity index "
                "'%s'", len(gone), self.key
            )
            self._remove_rows(gone)
        if new:
            if self.config.patches_field is None:
                vectors, ids, lids = self._field_embeddings(
                    self._dataset.select(new)
                )
            else:
                vectors, ids, lids = self._field_embeddings(
                    self._dataset.select_labels(
                        ids=new, fields=self.config.patches_field
                    )
                )
            self._add_rows(vectors, ids, lids)
        if gone or new:
            self._write_file()

    # --- persistence -----------------------------------------------------

    def _write_file(self):
        import faiss

        arrays = {
            "sample_ids": self._row_sample_ids.astype("<U24"),
            "norms": self._row_norms,
            "alive": self._alive,
        }
        if self._row_label_ids is not None:
            arrays["label_ids"] = self._row_label_ids.astype("<U24")
        if self._index is not None:
            arrays["index"] = faiss.serialize_index(self._index)
        if self._graph is not None:
            arrays["graph_neighbors"] = self._graph[1]
            arrays["graph_distances"] = self._graph[2]
        meta = {
            "version": _FILE_VERSION,
            "metric": self.config.metric,
            "dim": self._dim,
            "index_type": self._resolved_type,
            "search_param": self._search_param,
            "recall": self._recall,
            "graph_k": None if self._graph is None else self._graph[0],
            "checksum": _checksum(arrays),
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)

        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())

        self._replace_file(save)

    def _replace_file(self, write):
        """Replaces the index file atomically, under its lock.

        ``write(path)`` fills a temporary file beside it, which then takes
        the file's place, so readers see the old file or the new one.
        """
        from filelock import FileLock

        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        tmp = "%s.tmp-%d-%s" % (self._path, os.getpid(), uuid.uuid4().hex[:8])
        with FileLock(self._path + ".lock", timeout=300):
            try:
                write(tmp)
                os.replace(tmp, self._path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

    def _read_file(self):
        """Loads the index file; returns False (with a warning) on failure."""
        import faiss

        if not os.path.exists(self._path):
            reason = "is missing"
        else:
            try:
                with np.load(self._path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
                meta = json.loads(arrays.pop("meta").tobytes().decode())
                if meta.get("checksum") != _checksum(arrays):
                    raise ValueError("checksum mismatch")
                if meta["metric"] != self.config.metric:
                    raise ValueError("metric mismatch")
                self._dim = meta["dim"]
                self._resolved_type = meta["index_type"]
                self._search_param = meta["search_param"]
                self._recall = meta.get("recall")
                self._row_sample_ids = arrays["sample_ids"]
                self._row_label_ids = arrays.get("label_ids")
                if (self.config.patches_field is None) != (
                    self._row_label_ids is None
                ):
                    raise ValueError("patches mismatch")
                self._row_norms = arrays["norms"]
                self._alive = arrays["alive"]
                if "index" in arrays:
                    self._index = faiss.deserialize_index(arrays["index"])
                    if self._index.ntotal != len(self._alive):
                        raise ValueError("row count mismatch")
                elif self._alive.size:
                    raise ValueError("no faiss index")
                self._changed()
                if meta.get("graph_k"):
                    self._graph = (
                        meta["graph_k"],
                        arrays["graph_neighbors"],
                        arrays["graph_distances"],
                    )
                return True
            except Exception as e:  # corrupt in any way: rebuild
                reason = "is corrupt (%s)" % e
                self._reset_state(self.config)
        logger.warning(
            "dinoprop similarity index file '%s' of brain key '%s' %s; "
            "rebuilding it from the embeddings",
            self._path,
            self.key,
            reason,
        )
        return False

    # --- updates ---------------------------------------------------------

    def add_to_index(
        self,
        embeddings,
        sample_ids,
        label_ids=None,
        overwrite=True,
        allow_existing=True,
        warn_existing=False,
        reload=True,
    ):
        embeddings = np.asarray(embeddings)
        sample_ids = np.asarray(sample_ids)
        label_ids = np.asarray(label_ids) if label_ids is not None else None
        if len(embeddings) != len(sample_ids):
            raise DinopropError(
                "Got %d embeddings for %d IDs" % (len(embeddings), len(sample_ids))
            )
        if len(embeddings) == 0:
            return
        self._checked(embeddings)  # bad vectors fail before anything is written
        self._check_known_samples(sample_ids)
        ids = label_ids if self.config.patches_field is not None else sample_ids
        id_to_row = self._get_id_to_row()
        existing = np.array([i in id_to_row for i in ids], dtype=bool)
        if existing.any() and not overwrite:
            if not allow_existing:
                raise DinopropError(
                    "Found %d IDs (eg '%s') that are already in the index"
                    % (existing.sum(), ids[existing][0])
                )
            if warn_existing:
                logger.warning(
                    "Ignoring %d IDs that are already in the index",
                    existing.sum(),
                )
            keep = ~existing
            embeddings, sample_ids = embeddings[keep], sample_ids[keep]
            label_ids = label_ids[keep] if label_ids is not None else None
            if len(embeddings) == 0:
                return
        elif existing.any():
            self._remove_rows(ids[existing])

        if self.config.embeddings_field is not None:
            fbu.add_embeddings(
                self._dataset,
                embeddings,
                sample_ids,
                label_ids,
                self.config.embeddings_field,
                patches_field=self.config.patches_field,
            )
        self._add_rows(embeddings, sample_ids, label_ids)
        self._write_file()
        if reload:
            SimilarityIndex.reload(self)

    def _check_known_samples(self, sample_ids):
        unique = set(sample_ids.tolist())
        known = set(self._dataset.select(list(unique)).values("id"))
        if len(known) < len(unique):
            raise DinopropError(
                "%d of the sample IDs (eg '%s') are not in dataset '%s'"
                % (len(unique - known), next(iter(unique - known)), self._dataset.name)
            )

    def _add_rows(self, embeddings, sample_ids, label_ids):
        if self._index is None:
            self._build(embeddings, sample_ids, label_ids)
            return
        x, norms = self._prepare(embeddings)
        self._index.add(x)
        if self._resolved_type == "ivf":
            self._index.make_direct_map()
        self._row_sample_ids = np.concatenate(
            [self._row_sample_ids, np.asarray(sample_ids)]
        )
        if self._row_label_ids is not None:
            self._row_label_ids = np.concatenate(
                [self._row_label_ids, np.asarray(label_ids)]
            )
        self._row_norms = np.concatenate([self._row_norms, norms])
        self._alive = np.concatenate([self._alive, np.ones(len(x), bool)])
        self._changed()

    def remove_from_index(
        self,
        sample_ids=None,
        label_ids=None,
        allow_missing=True,
        warn_missing=False,
        reload=True,
    ):
        if label_ids is not None and self.config.patches_field is not None:
            ids = [label_ids] if etau.is_str(label_ids) else list(label_ids)
            rows = self._rows_of_label_ids(ids)
            missing = len(ids) - rows.size
        elif sample_ids is not None:
            ids = [sample_ids] if etau.is_str(sample_ids) else list(sample_ids)
            rows = self._rows_of_sample_ids(ids)
            present = set(self._row_sample_ids[rows].tolist())
            missing = len([i for i in ids if i not in present])
        else:
            return
        if missing and not allow_missing:
            raise DinopropError("%d IDs are not in the index" % missing)
        if missing and warn_missing:
            logger.warning("Ignoring %d IDs that are not in the index", missing)
        if rows.size == 0:
            return
        if self.config.embeddings_field is not None:
            patches = self.config.patches_field is not None
            fbu.remove_embeddings(
                self._dataset,
                self.config.embeddings_field,
                sample_ids=None if patches else self._row_sample_ids[rows],
                label_ids=self._row_label_ids[rows] if patches else None,
                patches_field=self.config.patches_field,
            )
        self._kill_rows(rows)
        self._write_file()
        if reload:
            SimilarityIndex.reload(self)

    def _rows_of_sample_ids(self, ids):
        wanted = set(ids)
        mask = np.array([i in wanted for i in self.sample_ids], dtype=bool)
        return self._alive_rows[mask] if mask.size else np.array([], int)

    def _rows_of_label_ids(self, ids):
        id_to_row = self._get_id_to_row()
        return np.array([id_to_row[i] for i in ids if i in id_to_row], int)

    def _remove_rows(self, ids):
        if self.config.patches_field is None:
            rows = self._rows_of_sample_ids(ids)
        else:
            rows = self._rows_of_label_ids(ids)
        self._kill_rows(rows)

    def _kill_rows(self, rows):
        """Removes rows: in place for flat indexes, else masked out.

        Masked rows of IVF/HNSW indexes are dropped by a rebuild once they
        are more than ``_COMPACT_FRACTION`` of the index.
        """
        import faiss

        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size == self._alive_rows.size:
            self._reset_state(self.config)
            return
        if self._resolved_type == "flat":
            selector = faiss.IDSelectorBatch(rows.size, faiss.swig_ptr(rows))
            self._index.remove_ids(selector)
            self._row_sample_ids = np.delete(self._row_sample_ids, rows)
            if self._row_label_ids is not None:
                self._row_label_ids = np.delete(self._row_label_ids, rows)
            self._row_norms = np.delete(self._row_norms, rows)
            self._alive = np.delete(self._alive, rows)
            self._changed()
            return
        self._alive[rows] = False
        self._changed()
        dead = self._alive.size - self._alive_rows.size
        if dead > _COMPACT_FRACTION * self._alive.size:
            vectors = self._original_vectors(self._alive_rows)
            self._build(vectors, self.sample_ids, self.label_ids)

    def _get_id_to_row(self):
        if self._id_to_row is None:
            ids = (
                self._row_label_ids
                if self.config.patches_field is not None
                else self._row_sample_ids
            )
            rows = self._alive_rows
            self._id_to_row = dict(zip(ids[rows].tolist(), rows.tolist()))
        return self._id_to_row

    # --- vectors ---------------------------------------------------------

    def _stored_vectors(self, rows):
        """The vectors as stored in faiss (unit norm for cosine)."""
        import faiss

        rows = np.asarray(rows, dtype=np.int64)
        if self._resolved_type == "flat":
            xb = faiss.rev_swig_ptr(
                self._index.get_xb(), self._index.ntotal * self._dim
            ).reshape(self._index.ntotal, self._dim)
            if rows.size == len(xb) and (rows == np.arange(rows.size)).all():
                return xb
            return xb[rows]
        if rows.size == 0:
            return np.empty((0, self._dim), np.float32)
        return self._index.reconstruct_batch(rows)

    def _original_vectors(self, rows):
        x = self._stored_vectors(rows)
        if self.config.metric == "cosine":
            x = x * self._row_norms[rows][:, None]
        return np.ascontiguousarray(x, dtype=np.float32)

    def get_embeddings(
        self,
        sample_ids=None,
        label_ids=None,
        allow_missing=True,
        warn_missing=False,
    ):
        if label_ids is not None:
            if self.config.patches_field is None:
                raise DinopropError("This index does not support label IDs")
            label_ids = [label_ids] if etau.is_str(label_ids) else list(label_ids)
            id_to_row = self._get_id_to_row()
            rows = [id_to_row[i] for i in label_ids if i in id_to_row]
            missing = len(label_ids) - len(rows)
        elif sample_ids is not None:
            sample_ids = (
                [sample_ids] if etau.is_str(sample_ids) else list(sample_ids)
            )
            if self.config.patches_field is not None:
                wanted = set(sample_ids)
                rows = [
                    r for r in self._alive_rows
                    if self._row_sample_ids[r] in wanted
                ]
                missing = 0
            else:
                id_to_row = self._get_id_to_row()
                rows = [id_to_row[i] for i in sample_ids if i in id_to_row]
                missing = len(sample_ids) - len(rows)
        else:
            rows, missing = self._alive_rows, 0
        if missing and not allow_missing:
            raise DinopropError("%d IDs are not in the index" % missing)
        if missing and warn_missing:
            logger.warning("Ignoring %d IDs not in the index", missing)
        rows = np.asarray(rows, dtype=np.int64)
        if self._index is None:
            vectors = np.empty((0, 0), np.float32)
        else:
            vectors = self._original_vectors(rows)
        lids = None if self._row_label_ids is None else self._row_label_ids[rows]
        return vectors, self._row_sample_ids[rows], lids

    def reload(self):
        """Re-reads the embeddings field and rebuilds the index if it changed."""
        if self.config.embeddings_field is not None:
            vectors, sample_ids, label_ids = self._field_embeddings()
            if not self._same_as(vectors, sample_ids, label_ids):
                self._rebuild_from(vectors, sample_ids, label_ids)
        super().reload()

    def _same_as(self, vectors, sample_ids, label_ids):
        ids = label_ids if self._row_label_ids is not None else sample_ids
        have = self.label_ids if self._row_label_ids is not None else self.sample_ids
        if self._index is None or len(ids) != len(have):
            return False
        id_to_row = self._get_id_to_row()
        if any(i not in id_to_row for i in ids):
            return False
        rows = np.array([id_to_row[i] for i in ids])
        return np.allclose(self._original_vectors(rows), vectors, atol=1e-4)

    def cleanup(self):
        _remove_index_file(self._path)

    def serialize(self, reflective=False):
        """Serializes the run results.

        The faiss index lives in its own file; only external embeddings
        (not stored in a dataset field) are kept here too, as compressed
        ``.npy`` bytes, so the index can be rebuilt if that file is lost.
        """
        d = {"cls": self.cls}
        if self.config.embeddings_field is None:
            vectors, sample_ids, label_ids = self.get_embeddings()
            d["embeddings"] = fou.serialize_numpy_array(vectors, ascii=True)
            d["sample_ids"] = sample_ids.tolist()
            if label_ids is not None:
                d["label_ids"] = label_ids.tolist()
        return d

    @classmethod
    def _from_dict(cls, d, samples, config, brain_key):
        embeddings = d.get("embeddings")
        if etau.is_str(embeddings):
            embeddings = fou.deserialize_numpy_array(embeddings)
        elif embeddings is not None:
            embeddings = np.array(embeddings)
        sample_ids = d.get("sample_ids")
        label_ids = d.get("label_ids")
        return cls(
            samples,
            config,
            brain_key,
            embeddings=embeddings,
            sample_ids=None if sample_ids is None else np.array(sample_ids),
            label_ids=None if label_ids is None else np.array(label_ids),
            load=True,
        )

    # --- the shared kNN graph ---------------------------------------------

    def knn(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest neighbours of every vector of the full index.

        Computed once with the index (approximate for ``"ivf"``/``"hnsw"``
        indexes, with the calibrated recall), cached in memory and in the
        index file, and recomputed only when the index changes.

        Args:
            k: neighbours per vector (capped at ``index_size - 1``)

        Returns:
            a tuple ``(neighbors, distances)`` of ``index_size x k`` arrays:
            int64 positions in :attr:`sample_ids` (``label_ids`` for patches),
            -1 where fewer exist, and float32 distances (cosine distance
            ``1 - similarity``, or Euclidean distance), nearest first
        """
        num = self.total_index_size
        k = int(min(k, max(num - 1, 0)))
        if self._graph is None or self._graph[0] < k:
            rows = self._alive_rows
            neighbors, dists = self._search_rows(
                self._stored_vectors(rows), k, rows, exclude_self=True
            )
            self._graph = (k, neighbors, dists)
            self._write_file()
        return self._graph[1][:, :k], self._graph[2][:, :k]

    def knn_graph(self, k: int):
        """The kNN graph of the full index as a sparse matrix.

        Args:
            k: neighbours per vector

        Returns:
            an ``index_size x index_size`` :class:`scipy.sparse.csr_matrix`
            whose row ``i`` holds the distances (see :meth:`knn`) from
            vector ``i`` to its ``k`` nearest neighbours (not symmetrised)
        """
        neighbors, dists = self.knn(k)
        return neighbors_to_csr(neighbors, dists)

    # --- searching -------------------------------------------------------

    def _current_rows(self):
        """Index rows of the current view, in current_sample_ids order."""
        if self._view_rows is None:
            keep = self._current_inds
            rows = self._alive_rows if keep is None else self._alive_rows[keep]
            self._view_rows = rows
        return self._view_rows

    def use_view(self, *args, **kwargs):
        self._view_rows = None
        return super().use_view(*args, **kwargs)

    def _exact_topk(self, queries, k, rows, reverse=False):
        """Exact top-k of prepared ``queries`` among ``rows`` (row labels)."""
        vectors = self._stored_vectors(rows)
        num = rows.size
        k = min(k, num)
        all_inds, all_dists = [], []
        for start in range(0, len(queries), _QUERY_CHUNK):
            q = queries[start : start + _QUERY_CHUNK]
            if self.config.metric == "cosine":
                scores = q @ vectors.T
            else:
                scores = -(
                    (q**2).sum(1)[:, None]
                    - 2 * q @ vectors.T
                    + (vectors**2).sum(1)[None, :]
                )
            if reverse:
                scores = -scores
            if k < num:
                part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            else:
                part = np.tile(np.arange(num), (len(q), 1))
            order = np.argsort(
                -np.take_along_axis(scores, part, 1), axis=1, kind="stable"
            )
            inds = np.take_along_axis(part, order, 1)
            top = np.take_along_axis(scores, inds, 1)
            if reverse:
                top = -top
            all_inds.append(rows[inds])
            all_dists.append(self._to_distance(top))
        return np.vstack(all_inds), np.vstack(all_dists)

    def _to_distance(self, scores):
        if self.config.metric == "cosine":
            return (1.0 - scores).astype(np.float32)
        return np.sqrt(np.maximum(-scores, 0)).astype(np.float32)

    def _search_rows(self, queries, k, rows, exclude_self=False, reverse=False):
        """Top-k search restricted to ``rows``; returns positions in rows."""
        import faiss

        num = rows.size
        kk = min(k + int(exclude_self), num)
        if kk <= 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.int64), empty.astype(np.float32)
        fraction = num / max(self._alive.size, 1)
        exact = (
            reverse
            or self._resolved_type == "flat"
            or num <= self.config.exact_threshold
            or kk > 1024
        )
        if exact:
            found, dists = self._exact_topk(queries, kk, rows, reverse=reverse)
        else:
            sel = None
            if num < self._alive.size:
                sel_ids = np.ascontiguousarray(rows, dtype=np.int64)
                sel = faiss.IDSelectorBatch(sel_ids.size, faiss.swig_ptr(sel_ids))
            params = self._params(kk, sel=sel, fraction=fraction)
            scores, found = self._index.search(queries, kk, params=params)
            if self.config.metric == "euclidean":
                scores = -scores
            dists = self._to_distance(scores)
            short = (found < 0).any(axis=1)
            if short.any():
                found[short], dists[short] = self._exact_topk(
                    queries[short], kk, rows
                )
        row_to_pos = np.full(len(self._alive), -1, dtype=np.int64)
        row_to_pos[rows] = np.arange(num)
        positions = np.where(found >= 0, row_to_pos[np.maximum(found, 0)], -1)
        if exclude_self:
            from dinoprop.graph import _drop_self

            k = kk - 1
            dists, positions = _drop_self(dists, positions, k)
        return positions, dists

    def _parse_neighbors_query(self, query):
        """Returns ``(prepared vectors or None, single_query)``."""
        if query is None:
            return None, False
        if etau.is_str(query):
            query_ids, single = [query], True
        else:
            query = np.asarray(query)
            if np.issubdtype(query.dtype, np.number):
                single = query.ndim == 1
                query = np.atleast_2d(query)
                if self._dim is not None and query.shape[1] != self._dim:
                    raise DinopropError(
                        "Query vectors have dimension %d; this index has "
                        "dimension %d" % (query.shape[1], self._dim)
                    )
                return query.astype(np.float32), single
            query_ids, single = list(query), False
        id_to_row = self._get_id_to_row()
        bad = [i for i in query_ids if i not in id_to_row]
        if bad:
            raise DinopropError(
                "Query IDs %s are not in similarity index '%s'" % (bad, self.key)
            )
        rows = np.array([id_to_row[i] for i in query_ids], dtype=np.int64)
        return self._original_vectors(rows), single

    def _kneighbors(
        self,
        query=None,
        k=None,
        reverse=False,
        aggregation=None,
        return_dists=False,
    ):
        if aggregation not in (None, "mean"):
            raise DinopropError(
                "Unsupported aggregation '%s'; this index supports 'mean'"
                % aggregation
            )
        if k is not None and (not isinstance(k, (int, np.integer)) or k < 1):
            raise DinopropError("k must be a positive integer; got %r" % (k,))
        rows = self._current_rows()
        vectors, single = self._parse_neighbors_query(query)
        full_index = vectors is None
        if full_index:
            if aggregation is not None:
                raise DinopropError("Full index queries do not support aggregation")
            k = 1 if k is None else k
            positions, dists = self._search_rows(
                self._stored_vectors(rows), k, rows, exclude_self=True
            )
        else:
            if aggregation == "mean" and len(vectors) > 1:
                vectors, single = vectors.mean(axis=0, keepdims=True), True
            if aggregation == "mean":
                single = True
            vectors = self._prepare(vectors)[0]
            k_all = k is None
            k = rows.size if k is None else k
            positions, dists = self._search_rows(vectors, k, rows, reverse=reverse)
            if not k_all and self._drop_deleted(rows, positions):
                return self._kneighbors(
                    query, k, reverse, aggregation, return_dists
                )
        inds = [p[p >= 0] for p in positions]
        dists = [d[p >= 0] for p, d in zip(positions, dists)]
        return self._format_output(inds, dists, full_index, single, return_dists)

    def _drop_deleted(self, rows, positions):
        """Removes samples deleted from the dataset since the index was built.

        Checks only the samples found by a query (one indexed lookup), so
        that a top-k answer never contains deleted samples and always has k
        results when k exist. Returns True if anything was removed.
        """
        from bson import ObjectId

        if self.config.patches_field is not None:
            return False
        found = np.unique(rows[positions[positions >= 0]])
        ids = self._row_sample_ids[found].tolist()
        if not ids:
            return False
        existing = {
            str(d["_id"])
            for d in self._dataset._sample_collection.find(
                {"_id": {"$in": [ObjectId(i) for i in ids]}}, {"_id": 1}
            )
        }
        missing = [i for i in ids if i not in existing]
        if not missing:
            return False
        if self.config.embeddings_field is not None:
            self._sync_with_field()
        else:
            logger.warning(
                "Dropping %d deleted samples from similarity index '%s'",
                len(missing),
                self.key,
            )
            self._remove_rows(missing)
            self._write_file()
        SimilarityIndex.reload(self)
        return True

    def _radius_neighbors(self, query=None, thresh=None, return_dists=False):
        rows = self._current_rows()
        vectors, single = self._parse_neighbors_query(query)
        full_index = vectors is None
        if full_index:
            vectors = self._stored_vectors(rows)
        else:
            vectors = self._prepare(vectors)[0]
        stored = self._stored_vectors(rows)
        inds, dists = [], []
        for start in range(0, len(vectors), _QUERY_CHUNK):
            q = vectors[start : start + _QUERY_CHUNK]
            if self.config.metric == "cosine":
                d = 1.0 - q @ stored.T
            else:
                d = np.sqrt(
                    np.maximum(
                        (q**2).sum(1)[:, None]
                        - 2 * q @ stored.T
                        + (stored**2).sum(1)[None, :],
                        0,
                    )
                )
            if full_index:
                d[np.arange(len(q)), np.arange(start, start + len(q))] = np.inf
            for row in d:
                hit = np.flatnonzero(row <= thresh)
                hit = hit[np.argsort(row[hit], kind="stable")]
                inds.append(hit)
                dists.append(row[hit])
        return self._format_output(inds, dists, full_index, single, return_dists)

    def _format_output(self, inds, dists, full_index, single_query, return_dists):
        if full_index:
            return (inds, dists) if return_dists else inds
        sample_ids = [list(self.current_sample_ids[i]) for i in inds]
        label_ids = None
        if self.config.patches_field is not None:
            label_ids = [list(self.current_label_ids[i]) for i in inds]
        dists = [list(map(float, d)) for d in dists]
        if single_query:
            sample_ids = sample_ids[0]
            label_ids = label_ids[0] if label_ids is not None else None
            dists = dists[0]
        if return_dists:
            return sample_ids, label_ids, dists
        return sample_ids, label_ids


def _checksum(arrays):
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def find_similarity_run(
    samples: Any,
    embeddings_field: str,
    patches_field: str | None = None,
    metric: str = "cosine",
) -> str | None:
    """Returns the key of a dinoprop similarity run on ``embeddings_field``.

    Args:
        samples: a sample collection
        embeddings_field: the embeddings field the run must index
        patches_field: the patches field the run must index, if any
        metric: the metric the run must use

    Returns:
        the brain key, or None if there is no such run
    """
    dataset = samples._root_dataset
    for key in dataset.list_brain_runs():
        config = dataset.get_brain_info(key).config
        if (
            getattr(config, "method", None) == "dinoprop"
            and getattr(config, "embeddings_field", None) == embeddings_field
            and getattr(config, "patches_field", None) == patches_field
            and getattr(config, "metric", None) == metric
        ):
            return key
    return None
