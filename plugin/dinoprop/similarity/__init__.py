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
``$DINOPROP_INDEX_DIR`` when set, else a ``dinoprop-<name>/indexes`` folder
beside FiftyOne's database directory ``<name>`` (``fo.config.database_dir``),
by default ``~/.fiftyone/var/lib/dinoprop-mongo/indexes``; folders and files
are private to the user (0700 and 0600). The file holds the serialized faiss
index, the sample/label IDs of its rows and the cached kNN graph. It is
written to a temporary file and renamed into place while holding a file lock,
so a crash or concurrent writers never leave a half-written index. When the
file is missing or corrupt, the index is rebuilt from the embeddings (with a
warning) and written again. When the embeddings live in a dataset field,
loading the index also drops samples deleted since and adds samples embedded
since.

Modules: :mod:`~dinoprop.similarity.files` (index files and where they
live), :mod:`~dinoprop.similarity.brain` (the FiftyOne Brain config and
method), :mod:`~dinoprop.similarity.index` (the index),
:mod:`~dinoprop.similarity.search` (its searches),
:mod:`~dinoprop.similarity.updates` (its additions, removals and syncing),
:mod:`~dinoprop.similarity.api` (``compute_similarity()``) and
:mod:`~dinoprop.similarity.knn` (kNN graphs reusing an index's graph).
"""

from dinoprop.similarity.files import INDEX_DIR_ENV, index_dir, prune_index_files
from dinoprop.similarity.brain import (
    EXACT_THRESHOLD,
    INDEX_TYPES,
    METRICS,
    DinopropSimilarity,
    DinopropSimilarityConfig,
)
from dinoprop.similarity.index import TARGET_RECALL, DinopropSimilarityIndex
from dinoprop.similarity.updates import STALE_PROBES
from dinoprop.similarity.api import compute_similarity, find_similarity_run
from dinoprop.similarity.knn import cached_knn, sample_knn_graph

__all__ = [
    "EXACT_THRESHOLD",
    "INDEX_DIR_ENV",
    "INDEX_TYPES",
    "METRICS",
    "STALE_PROBES",
    "TARGET_RECALL",
    "DinopropSimilarity",
    "DinopropSimilarityConfig",
    "DinopropSimilarityIndex",
    "cached_knn",
    "compute_similarity",
    "find_similarity_run",
    "index_dir",
    "prune_index_files",
    "sample_knn_graph",
]
