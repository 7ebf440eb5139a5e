"""The FiftyOne Brain config and method classes of the ``"dinoprop"`` backend.

FiftyOne stores the config's class path in each run document and imports it
to load the run, so these classes keep the public path
``dinoprop.similarity.<name>`` whatever module defines them.
"""

from __future__ import annotations

import uuid

import numpy as np
from fiftyone.brain.similarity import Similarity, SimilarityConfig

from dinoprop.core import DinopropError
from dinoprop.similarity.files import check_index_id, index_path, remove_index_file

#: Indexes up to this many vectors use exact search when ``index_type="auto"``.
EXACT_THRESHOLD = 10000
#: The supported distance metrics (``metric``).
METRICS = ("cosine", "euclidean")
#: The supported index types (``index_type``): see :mod:`dinoprop.similarity`.
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")


def check_options(metric: str, index_type: str, exact_threshold: int) -> None:
    """Raises DinopropError unless the index options are supported."""
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

    Args:
        config: a :class:`DinopropSimilarityConfig`
    """

    __module__ = "dinoprop.similarity"

    def ensure_requirements(self):
        import faiss  # noqa: F401

    def initialize(self, samples, brain_key):
        from dinoprop.similarity.index import DinopropSimilarityIndex

        return DinopropSimilarityIndex(
            samples, self.config, brain_key, backend=self
        )

    def cleanup(self, samples, brain_key):
        remove_index_file(config_index_path(samples, self.config))


def config_index_path(samples, config: DinopropSimilarityConfig) -> str:
    """The index file of the run with ``config`` on ``samples``' dataset."""
    return index_path(str(samples._root_dataset._doc.id), config.index_id)
