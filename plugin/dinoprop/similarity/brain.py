"""The FiftyOne Brain config and method classes of the ``"dinoprop"`` backend.

FiftyOne stores the config's class path in each run document and imports it
to load the run, so these classes keep the public path
``dinoprop.similarity.<name>`` whatever module defines them.
"""

from __future__ import annotations

import logging
import uuid

from fiftyone.brain.similarity import Similarity, SimilarityConfig

from dinoprop.core import DinopropError, check_int
from dinoprop.similarity import files
from dinoprop.similarity.files import check_index_id, index_path, remove_index_file

logger = logging.getLogger(__name__)

#: Indexes up to this many vectors use exact search when ``index_type="auto"``.
EXACT_THRESHOLD = 10000
#: The supported distance metrics (``metric``).
METRICS = ("cosine", "euclidean")
#: The supported index types (``index_type``): see :mod:`dinoprop.similarity`.
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")


def check_options(metric: str, index_type: str, exact_threshold: int) -> None:
    """Raises DinopropError unless the index options are supported."""
    check_int(exact_threshold, "exact_threshold", minimum=0)
    if metric not in METRICS:
        raise DinopropError(
            "Unsupported metric '%s'; use one of %s" % (metric, METRICS)
        )
    if index_type not in INDEX_TYPES:
        raise DinopropError(
            "Unsupported index_type '%s'; use one of %s"
            % (index_type, INDEX_TYPES)
        )


class DinopropSimilarityConfig(SimilarityConfig):
    """Configuration of the dinoprop faiss similarity backend.

    Args:
        metric: ``"cosine"`` or ``"euclidean"``
        index_type: ``"auto"``, ``"flat"``, ``"ivf"`` or ``"hnsw"``
        exact_threshold: the largest index that ``"auto"`` keeps exact
        index_id: the name of the index file (generated when omitted): 1-64
            letters, digits, ``_`` or ``-``
        **kwargs: keyword arguments for
            :class:`fiftyone.brain.similarity.SimilarityConfig`
    """

    __module__ = "dinoprop.similarity"  # the class path stored in run documents

    def __init__(
        self,
        metric: str = "cosine",
        index_type: str = "auto",
        exact_threshold: int = EXACT_THRESHOLD,
        index_id: str | None = None,
        **kwargs,
    ):
        check_options(metric, index_type, exact_threshold)
        super().__init__(**kwargs)
        self.metric = metric
        self.index_type = index_type
        self.exact_threshold = int(exact_threshold)
        self.index_id = check_index_id(index_id or uuid.uuid4().hex)

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

    FiftyOne Brain registers a run before building its index; this backend
    registers it once the index is built (in :meth:`save_run_results`), so
    that a build that fails or is killed leaves no run behind, and two
    builds under one key cannot both register.

    Args:
        config: a :class:`DinopropSimilarityConfig`
    """

    __module__ = "dinoprop.similarity"

    def __init__(self, config):
        super().__init__(config)
        self._deferred = None  # (key, overwrite, cleanup) of register_run()

    def ensure_requirements(self):
        import importlib.util

        if importlib.util.find_spec("faiss") is None:
            raise DinopropError(
                "The dinoprop similarity backend needs faiss; install it with "
                "`pip install faiss-cpu`"
            )

    def initialize(self, samples, brain_key):
        from dinoprop.similarity.index import DinopropSimilarityIndex

        files.remove_orphans(str(samples._root_dataset._doc.id))
        return DinopropSimilarityIndex(
            samples, self.config, brain_key, backend=self
        )

    def register_run(self, samples, key, overwrite=True, cleanup=True):
        """Checks that the run can be stored; :meth:`save_run_results`
        registers it once its index is built."""
        if key is None:
            return
        _remove_stale_run(samples._root_dataset, key)
        self.validate_run(samples, key, overwrite=overwrite)
        self._deferred = (key, overwrite, cleanup)

    def save_run_results(self, samples, key, run_results, overwrite=True, cache=True):
        """Registers the run if :meth:`register_run` deferred it, then saves
        its results and lets other processes clean up around its file."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None and deferred[0] == key:
            self._register_built(samples, key, run_results, *deferred[1:])
        super().save_run_results(samples, key, run_results, overwrite=overwrite, cache=cache)
        if key is not None:
            run_results.release_build_lock()

    def _register_built(self, samples, key, run_results, overwrite, cleanup):
        dataset = samples._root_dataset
        with files.runs_lock(str(dataset._doc.id)):
            dataset.reload()  # runs that other processes registered meanwhile
            try:
                super().register_run(dataset, key, overwrite=overwrite, cleanup=cleanup)
            except ValueError as e:
                run_results.discard()
                raise DinopropError(
                    "%s: it was registered while this index was built (by "
                    "another process?). Choose another brain key, or delete "
                    "the run and build again" % e
                ) from e

    def cleanup(self, samples, brain_key):
        remove_index_file(config_index_path(samples, self.config))


def _remove_stale_run(dataset, key):
    """Deletes a dinoprop run under ``key`` that a killed build left half-saved.

    Such a run (registered, but without results, by dinoprop versions that
    registered runs before building them) cannot be loaded. A build in
    progress holds its index's lock until its results are saved, so a run
    without results whose lock is free is never coming back.
    """
    if key not in dataset.list_brain_runs():
        return
    run_doc = dataset._doc.brain_methods[key]
    config = run_doc.config or {}
    if run_doc.results or config.get("method") != "dinoprop":
        return
    path = index_path(str(dataset._doc.id), check_index_id(config.get("index_id")))
    with files.unless_locked(path) as free:
        if not free:
            return  # a live build
    logger.warning("Deleting similarity run '%s', left unfinished by a killed build", key)
    dataset.delete_brain_run(key)


def config_index_path(samples, config: DinopropSimilarityConfig) -> str:
    """The index file of the run with ``config`` on ``samples``' dataset."""
    return index_path(str(samples._root_dataset._doc.id), config.index_id)
