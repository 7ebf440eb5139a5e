"""Searching a :class:`~dinoprop.similarity.DinopropSimilarityIndex`.

The searches FiftyOne Brain asks of a similarity index (k nearest and
radius neighbours, by ID or by vector, restricted to the current view) and
the cached kNN graph of the whole index, written as a mixin of the index.
"""

from __future__ import annotations

import logging

import numpy as np

import eta.core.utils as etau
from fiftyone.brain.similarity import SimilarityIndex

from dinoprop.core import DinopropError, check_int
from dinoprop.graph import _drop_self, neighbors_to_csr, search_ivf

logger = logging.getLogger(__name__)

_QUERY_CHUNK = 1024


class IndexSearchMixin:
    """The search methods of :class:`~dinoprop.similarity.DinopropSimilarityIndex`.

    Relies on the index's rows (``_alive``, ``_alive_rows``, ``_index``,
    ``_resolved_type``), vectors (``_stored_vectors``, ``_original_vectors``,
    ``_prepare``) and FiftyOne Brain's view state.
    """

    # --- the shared kNN graph ---------------------------------------------

    def knn(self, k: int, search=None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest neighbours of every vector of the full index.

        Computed once with the index (approximate for ``"ivf"``/``"hnsw"``
        indexes, with the calibrated recall), cached in memory and in the
        index file, and recomputed only when the index changes.

        Args:
            k: neighbours per vector (capped at ``index_size - 1``)
            search: optionally, how an ``"ivf"`` index without deleted rows
                searches all its vectors when the graph is computed: a
                function like :func:`dinoprop.graph.search_ivf` (the
                default), e.g. a
                :class:`dinoprop.graph_distributed.ShardedSearch` on a Ray
                cluster, which finds the same neighbours

        Returns:
            a tuple ``(neighbors, distances)`` of ``index_size x k`` arrays:
            int64 positions in :attr:`sample_ids` (``label_ids`` for patches),
            -1 where fewer exist, and float32 distances (cosine distance
            ``1 - similarity``, or Euclidean distance), nearest first
        """
        k = int(min(k, max(self.total_index_size - 1, 0)))
        if not self.has_knn(k):
            rows = self._alive_rows
            neighbors, dists = self._search_rows(
                self._stored_vectors(rows), k, rows, exclude_self=True, search=search
            )
            self._graph = (k, neighbors, dists)
            self._write_file()
        return self._graph[1][:, :k], self._graph[2][:, :k]

    def has_knn(self, k: int) -> bool:
        """Whether :meth:`knn` of ``k`` neighbours is already computed (and
        returns without searching).

        Args:
            k: neighbours per vector (capped at ``index_size - 1``)
        """
        k = int(min(k, max(self.total_index_size - 1, 0)))
        return self._graph is not None and self._graph[0] >= k

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

    def _search_rows(
        self, queries, k, rows, exclude_self=False, reverse=False, search=None
    ):
        """Top-k search restricted to ``rows``; returns positions in rows.
        ``search`` replaces :func:`search_ivf` for all-row IVF searches."""
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
            if sel is None and self._resolved_type == "ivf":
                # many queries (the kNN graph) go list by list
                search = search or search_ivf
                scores, found = search(self._index, queries, kk, params.nprobe)
            else:
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
        if k is not None:
            check_int(k, "k")
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
