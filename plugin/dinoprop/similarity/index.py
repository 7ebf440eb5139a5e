"""The faiss similarity index of a dinoprop FiftyOne Brain run.

The index (:class:`DinopropSimilarityIndex`) builds a faiss index from the
embeddings, keeps it in its file (:mod:`dinoprop.similarity.files`) and
serves its vectors; its searches are in :mod:`dinoprop.similarity.search` and
its updates in :mod:`dinoprop.similarity.updates`.
"""

from __future__ import annotations

import contextvars
import logging
import os

import numpy as np

import eta.core.utils as etau

import fiftyone.core.utils as fou
from fiftyone.brain.similarity import DuplicatesMixin, SimilarityIndex

from dinoprop.core import (
    DinopropError,
    l2_normalize,
    progress_bar,
    read_embeddings,
    row_norms,
)
from dinoprop.graph import (
    CALIBRATION_QUERIES,
    ivf_index,
    knn_search_queries,
    nprobe_options,
    serialize_faiss_index,
    tune_recall,
)
from dinoprop.similarity import files
from dinoprop.similarity.brain import config_index_path
from dinoprop.similarity.search import IndexSearchMixin
from dinoprop.similarity.updates import IndexUpdatesMixin

logger = logging.getLogger(__name__)

#: Minimum recall@10 against exact search that approximate indexes are tuned to.
TARGET_RECALL = 0.95
_FILE_VERSION = 1
_ADD_CHUNK = 20000
#: The ``progress`` argument of the compute_similarity() call in progress
PROGRESS = contextvars.ContextVar("dinoprop_similarity_progress", default=None)


class DinopropSimilarityIndex(
    IndexUpdatesMixin, IndexSearchMixin, SimilarityIndex, DuplicatesMixin
):
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

    __module__ = "dinoprop.similarity"  # the class path stored in run results

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
        self._path = config_index_path(samples, config)
        self._seconds = None
        self._build_lock = None
        if not load:  # held until the run is registered
            self._build_lock = files.index_lock(self._path)
            self._build_lock.acquire()
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
        norms = row_norms(x).astype(np.float32, copy=False)
        if self.config.metric == "cosine":
            x = l2_normalize(x, norms)
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
        with progress_bar(num, PROGRESS.get(), "vectors") as pb:
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
            lambda q: knn_search_queries(x, q, 10, self._index.metric_type),
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
        """The embeddings in the field; none while the field does not exist.

        FiftyOne Brain lets a run name a field that ``add_to_index()`` will
        create, so a missing field is an empty index, not an error.
        """
        samples = self._dataset if samples is None else samples
        if not self._field_exists():
            return np.zeros((0, 0), np.float32), np.array([], "<U24"), None
        return read_embeddings(
            samples,
            self.config.embeddings_field,
            self.config.patches_field,
            allow_empty=True,
        )

    def _field_exists(self):
        path = self.config.embeddings_field
        if self.config.patches_field is not None:
            _, path = self._dataset._get_label_field_path(
                self.config.patches_field, path
            )
        return self._dataset.has_field(path)

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
            p for p in glob.glob(os.path.join(files.index_dir(), "*", name)) if p != self._path
        ]
        if not sources:
            return
        files.replace_file(self._path, lambda tmp: shutil.copyfile(sources[0], tmp))
        logger.info("Copied similarity index '%s' from %s", self.key, sources[0])

    # --- persistence -----------------------------------------------------

    def _write_file(self):
        arrays = {
            "sample_ids": self._row_sample_ids.astype("<U24"),
            "norms": self._row_norms,
            "alive": self._alive,
        }
        if self._row_label_ids is not None:
            arrays["label_ids"] = self._row_label_ids.astype("<U24")
        if self._index is not None:
            arrays["index"] = serialize_faiss_index(self._index)
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
        }
        files.write_arrays(self._path, arrays, meta)

    def _read_file(self):
        """Loads the index file; returns False (with a warning) on failure."""
        import faiss

        if not os.path.exists(self._path):
            reason = "is missing"
        else:
            try:
                arrays, meta = files.read_arrays(self._path)
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
        files.remove_index_file(self._path)

    def release_build_lock(self) -> None:
        """Marks a new index as settled: registered, or never to be.

        Until then its file is not treated as an orphan
        (:func:`dinoprop.similarity.files.remove_orphans`).
        """
        lock, self._build_lock = self._build_lock, None
        if lock is not None:
            lock.release()

    def discard(self) -> None:
        """Deletes the file of a new index whose run was not registered."""
        files.remove_index_file(self._path)
        self.release_build_lock()

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
        if etau.is_str(embeddings):  # as serialize() writes them
            embeddings = fou.deserialize_numpy_array(embeddings, ascii=True)
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
