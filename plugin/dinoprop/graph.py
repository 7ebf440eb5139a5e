"""k-nearest-neighbour graphs of embeddings, computed with faiss.

The graph is the one structure shared by UMAP and label propagation: a
dinoprop similarity run caches the graph of its index
(:meth:`dinoprop.similarity.DinopropSimilarityIndex.knn`), and
:func:`dinoprop.similarity.sample_knn_graph` and
:func:`dinoprop.compute_visualization` reuse it when it covers their samples
instead of searching again. This module knows nothing of similarity runs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dinoprop.core import l2_normalize


def knn_search(
    embeddings: np.ndarray, k: int, exclude_self: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest neighbours of every row of ``embeddings``.

    Args:
        embeddings: a ``num x dim`` array
        k: the number of neighbours per row (capped at ``num - 1`` when
            ``exclude_self`` is True)
        exclude_self: whether a point is left out of its own neighbours

    Returns:
        a tuple ``(neighbors, similarities)`` of ``num x k`` arrays: int64
        row indices (-1 where fewer than k exist) and float32 cosine
        similarities, best first
    """
    import faiss

    x = unit_vectors(embeddings)
    num = x.shape[0]
    k = int(min(k, num - 1 if exclude_self else num))
    if k <= 0:
        return np.empty((num, 0), np.int64), np.empty((num, 0), np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nbrs = index.search(x, k + 1 if exclude_self else k)
    if exclude_self:
        sims, nbrs = _drop_self(sims, nbrs, k)
    return nbrs.astype(np.int64), sims.astype(np.float32)


#: From this many vectors :func:`graph_search` searches approximately.
#: Exact search costs ``N^2``, IVF about ``N^1.5``: on 100k synthetic 32-d
#: vectors (100 classes, 2 shared cores) exact search took 24.6 s, IVF
#: 5.7 s at recall@10 0.978, and ``propagate`` on the IVF graph was as
#: accurate (97.61% against 97.55%, mean of 3 seed draws at 10 seeds per
#: class). Below it the exact graph is cheap and keeps small results
#: reproducible.
APPROXIMATE_MIN_NODES = 50_000


def graph_search(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The kNN graph search for a whole collection: exact below
    :data:`APPROXIMATE_MIN_NODES` vectors (:func:`knn_search`), above it
    :func:`approximate_knn_search` (IVF, recall@k calibrated to 0.97).

    Args:
        embeddings: a ``num x dim`` array
        k: the number of neighbours per row, self excluded

    Returns:
        the ``(neighbors, similarities)`` of :func:`knn_search`
    """
    if len(embeddings) < APPROXIMATE_MIN_NODES:
        return knn_search(embeddings, k)
    return approximate_knn_search(embeddings, k)


def approximate_knn_search(
    embeddings: np.ndarray,
    k: int,
    target_recall: float = 0.97,
    search: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate cosine kNN of every row, for large inputs.

    Uses a faiss IVF index whose number of probed lists is the smallest
    reaching ``target_recall`` (recall@k against exact search, measured on
    :data:`CALIBRATION_QUERIES` rows): :func:`graph_index`. Falls back to
    :func:`knn_search` for small inputs.

    Args:
        embeddings: a ``num x dim`` array
        k: the number of neighbours per row, self excluded
        target_recall: the recall@k to reach
        search: how every row is searched in the calibrated index, a
            function like :func:`search_ivf` (the default, in this
            process); :func:`dinoprop.graph_distributed.ray_graph_search`
            passes one that searches shards of rows on a Ray cluster

    Returns:
        the ``(neighbors, similarities)`` of :func:`knn_search`
    """
    x = unit_vectors(embeddings)
    num = x.shape[0]
    k = int(min(k, num - 1))
    if num < 4 * CALIBRATION_QUERIES or k <= 0:
        return knn_search(embeddings, k)
    index, nprobe = graph_index(x, k, target_recall)
    sims, nbrs = (search or search_ivf)(index, x, k + 1, nprobe)
    return complete_graph(x, sims, nbrs, k)


def unit_vectors(embeddings: np.ndarray) -> np.ndarray:
    """The rows of ``embeddings`` as unit-norm, C-contiguous float32 (a new
    array; float32 input is not copied first)."""
    return np.ascontiguousarray(l2_normalize(np.asarray(embeddings, np.float32)))


def graph_index(x: np.ndarray, k: int, target_recall: float = 0.97) -> tuple:
    """The filled IVF index that :func:`approximate_knn_search` searches.

    :func:`calibrated_index` of ``x`` for its own rows as queries, ``k + 1``
    results per row (each row finds itself).

    Args:
        x: the ``num x dim`` unit vectors of :func:`unit_vectors`
        k: the neighbours per row, self excluded
        target_recall: the recall@k to reach

    Returns:
        a tuple ``(index, nprobe)``: a :class:`faiss.IndexIVFFlat` (inner
        product) holding ``x``, and the number of lists to probe
    """
    return calibrated_index(x, x, k + 1, target_recall)


def calibrated_index(
    x: np.ndarray, queries: np.ndarray, k: int, target_recall: float = 0.97
) -> tuple:
    """An IVF index holding ``x``, and how many lists to probe for ``queries``.

    Trained by :func:`ivf_index` and filled with ``x``; the number of
    probed lists is the smallest whose recall@k reaches ``target_recall``
    against exact search on :data:`CALIBRATION_QUERIES` of the queries.

    Args:
        x: the ``num x dim`` float32 rows indexed
        queries: ``num_queries x dim`` float32 rows like those to search
        k: the results per query
        target_recall: the recall@k to reach

    Returns:
        a tuple ``(index, nprobe)``
    """
    import faiss

    index = ivf_index(x, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    nprobe, _ = tune_recall(
        queries,
        lambda rows, p: search_ivf(index, rows, k, p)[1],
        nprobe_options(index.nlist),
        lambda rows: knn_search_queries(x, rows, k),
        target_recall,
    )
    return index, nprobe


#: Query sets at least this large, of at least this many dimensions, are
#: searched list by list (:func:`search_ivf`). Measured here on clustered
#: data at 100k rows, list by list took 0.15x the CPU of faiss's search at
#: 384-d, 0.3x at 128-d, 0.7x at 64-d and 1.2x at 32-d (where the
#: products are too small to pay for the bookkeeping).
LIST_BY_LIST_MIN_QUERIES = 20_000
LIST_BY_LIST_MIN_DIM = 64


def search_ivf(index, queries: np.ndarray, k: int, nprobe: int) -> tuple:
    """``index.search(queries, k)`` probing ``nprobe`` lists.

    Large query sets (from :data:`LIST_BY_LIST_MIN_QUERIES` rows of
    :data:`LIST_BY_LIST_MIN_DIM` dimensions, such as every row of a
    collection searching for its graph neighbours) are searched list by
    list instead (:func:`search_list_by_list`): the same probed lists and
    the same exact similarities, so the same results, for a sixth to a
    tenth of the CPU at 384-d.

    Args:
        index: a filled :class:`faiss.IndexIVFFlat`
        queries: ``num_queries x dim`` float32 rows
        k: the results per query
        nprobe: the lists to probe per query

    Returns:
        faiss's ``(similarities, neighbors)``: ``num_queries x k`` float32
        and int64 arrays (-1 where the probed lists hold fewer vectors)
    """
    import faiss

    num, dim = queries.shape
    many = num >= LIST_BY_LIST_MIN_QUERIES and dim >= LIST_BY_LIST_MIN_DIM
    if many and type(index) is faiss.IndexIVFFlat:  # what faiss's parts support
        return search_list_by_list(index, queries, k, nprobe)
    params = faiss.SearchParametersIVF(nprobe=int(nprobe))
    return index.search(queries, k, params=params)


def search_list_by_list(index, queries: np.ndarray, k: int, nprobe: int) -> tuple:
    """:func:`search_ivf` of many queries, one inverted list at a time.

    faiss's ``index.search`` scans the probed lists query by query, so
    each query reads ``nprobe`` lists from memory and the search is bound
    by memory bandwidth (at 1M 384-d rows, 1,000 lists and 4 probes: about
    1,450 CPU s on this project's 2-core machine). faiss's big-batch search
    (:mod:`faiss.contrib.big_batch_search`) instead assigns every query to
    its probed lists first, then compares each list with all the queries
    probing it in one matrix product: 135 CPU s for the same results.
    faiss's driver function prints progress on every list, so its
    sequential loop is run here with the same parts. Arguments and
    results are those of :func:`search_ivf`.
    """
    from faiss.contrib.big_batch_search import BigBatchSearcher, BlockComputer

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    searcher = BigBatchSearcher(index, queries, k)
    computer = BlockComputer(index)
    searcher.decode_func = computer.decode_func
    searcher.by_residual = computer.by_residual
    _, assign = index.quantizer.search(queries, int(nprobe))
    searcher.q_assign = assign.astype(np.int32)
    searcher.reorder_assign()
    for lst in range(index.nlist):
        rows, list_queries, list_ids, list_vectors = searcher.prepare_bucket(lst)
        sims, found = computer.block_search(list_queries, list_vectors, list_ids, k)
        searcher.add_results_to_heap(rows, sims, list_ids, found)
    searcher.rh.finalize()
    return searcher.rh.D, searcher.rh.I


def complete_graph(x: np.ndarray, sims: np.ndarray, nbrs: np.ndarray, k: int) -> tuple:
    """The graph of :func:`approximate_knn_search` from its raw IVF search.

    Rows whose probed lists held fewer than ``k + 1`` vectors are searched
    again exactly; then each row's own index is dropped.

    Args:
        x: the ``num x dim`` unit vectors that were indexed and queried
        sims: the ``num x (k + 1)`` similarities of :func:`search_ivf`
        nbrs: its ``num x (k + 1)`` neighbours (modified in place)
        k: the neighbours per row, self excluded

    Returns:
        the ``(neighbors, similarities)`` of :func:`knn_search`
    """
    sims, nbrs = _fill_short_rows(x, x, sims, nbrs)
    sims, nbrs = _drop_self(sims, nbrs, k)
    return nbrs.astype(np.int64), sims.astype(np.float32)


def approximate_search(
    x: np.ndarray, queries: np.ndarray, k: int, target_recall: float = 0.97
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``x`` of highest inner product with each query,
    approximately (exactly for small ``x``).

    A faiss IVF index over ``x`` probes the fewest lists reaching
    ``target_recall`` (:func:`calibrated_index`); a query the probed lists
    leave short of ``k`` rows is searched exactly.

    Args:
        x: the ``num x dim`` float32 rows searched (unit norm for cosine)
        queries: ``num_queries x dim`` float32 rows
        k: the rows per query, at most ``num``
        target_recall: the recall@k to reach

    Returns:
        a tuple ``(similarities, indices)`` of ``num_queries x k`` arrays,
        best first (faiss's order)
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(x) < 4 * CALIBRATION_QUERIES:
        return faiss.knn(queries, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    index, nprobe = calibrated_index(x, queries, k, target_recall)
    sims, nbrs = search_ivf(index, queries, k, nprobe)
    return _fill_short_rows(x, queries, sims, nbrs)


def _fill_short_rows(x, queries, sims, nbrs):
    """Searches exactly the queries whose probed lists held too few rows."""
    k = nbrs.shape[1]
    missing = (nbrs < 0).any(axis=1)
    if missing.any():
        nbrs[missing] = knn_search_queries(x, queries[missing], k)
        sims[missing] = np.take_along_axis(queries[missing] @ x.T, nbrs[missing], axis=1)
    return sims, nbrs


#: Rows used to measure the recall of approximate searches.
CALIBRATION_QUERIES = 256


def ivf_index(x: np.ndarray, metric_type: int):
    """A trained, empty faiss ``IndexIVFFlat`` for vectors like ``x``.

    Args:
        x: a ``num x dim`` float32 array (a sample of it trains the lists)
        metric_type: a faiss metric (``faiss.METRIC_INNER_PRODUCT`` or
            ``faiss.METRIC_L2``)

    Returns:
        a :class:`faiss.IndexIVFFlat` with about ``sqrt(num)`` lists
    """
    import faiss

    num, dim = x.shape
    nlist = int(np.clip(np.sqrt(num), 16, 65536))
    quantizer = faiss.IndexFlat(dim, metric_type)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric_type)
    rng = np.random.default_rng(0)
    index.train(x[rng.choice(num, min(num, 40 * nlist), replace=False)])
    return index


def nprobe_options(nlist: int) -> list:
    """Candidate numbers of probed lists, cheapest first."""
    options = [p for p in (4, 8, 16, 32, 64, 128, 256) if p < nlist]
    return options + [nlist]


def tune_recall(x, search, options, exact, target):
    """The first search option whose recall@k reaches ``target``.

    Args:
        x: the indexed ``num x dim`` vectors; some of them are the queries
        search: ``search(queries, option) -> num_queries x k`` neighbour ids
        options: search options, cheapest first
        exact: ``exact(queries) -> num_queries x k`` exact neighbour ids
        target: the recall to reach

    Returns:
        a tuple ``(option, recall)``; the last option if none reaches it
    """
    rng = np.random.default_rng(1)
    rows = rng.choice(len(x), min(len(x), CALIBRATION_QUERIES), replace=False)
    queries = x[rows]
    truth = exact(queries)
    for option in options:
        found = search(queries, option)
        recall = float(
            np.mean(
                [
                    len(set(a) & set(b)) / float(len(a))
                    for a, b in zip(truth, found)
                ]
            )
        )
        if recall >= target:
            break
    return option, recall


def knn_search_queries(
    x: np.ndarray, queries: np.ndarray, k: int, metric_type: int | None = None
) -> np.ndarray:
    """Exact top-``k`` rows of ``x`` for each query, by inner product or
    by another faiss ``metric_type`` (``faiss.METRIC_L2``); searched in
    blocks, so it holds no ``num_queries x num`` score matrix."""
    import faiss

    return faiss.knn(
        np.ascontiguousarray(queries),
        np.ascontiguousarray(x),
        k,
        metric=faiss.METRIC_INNER_PRODUCT if metric_type is None else metric_type,
    )[1]


def serialize_faiss_index(index) -> np.ndarray:
    """What ``faiss.serialize_index`` returns, a ``uint8`` array, holding
    one copy of the index's bytes rather than its 2.5 (a growing buffer,
    then a copy): a first pass counts the bytes, a second fills the array."""
    import faiss

    size = 0

    def count(chunk):
        nonlocal size
        size += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    data = np.empty(size, np.uint8)
    filled = 0

    def fill(chunk):
        nonlocal filled
        data[filled : filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
        filled += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(fill))
    if filled != size:
        raise RuntimeError("faiss wrote %d bytes, then %d" % (size, filled))
    return data


def knn_graph(embeddings: np.ndarray, k: int):
    """The cosine kNN graph of ``embeddings`` as a sparse matrix.

    Args:
        embeddings: a ``num x dim`` array
        k: neighbours per node

    Returns:
        a ``num x num`` :class:`scipy.sparse.csr_matrix` whose row ``i``
        holds the similarities of the ``k`` nearest neighbours of ``i``
        (not symmetrised)
    """
    neighbors, sims = knn_search(embeddings, k)
    return neighbors_to_csr(neighbors, sims)


def neighbors_to_csr(neighbors: np.ndarray, sims: np.ndarray):
    """Converts ``num x k`` neighbour/similarity arrays to a CSR matrix."""
    import scipy.sparse as sp

    num, k = neighbors.shape
    rows = np.repeat(np.arange(num), k)
    cols = neighbors.ravel()
    valid = cols >= 0
    return sp.csr_matrix(
        (sims.ravel()[valid], (rows[valid], cols[valid])), shape=(num, num)
    )


def _drop_self(sims, nbrs, k):
    """Removes each row's own index from its neighbour list, keeping k."""
    num = nbrs.shape[0]
    is_self = nbrs == np.arange(num)[:, None]
    # Rows where self was not returned (exact duplicates) drop the last hit
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    keep = ~is_self
    return (
        sims[keep].reshape(num, k),
        nbrs[keep].reshape(num, k),
    )
