"""Updating a :class:`~dinoprop.similarity.DinopropSimilarityIndex`.

Adding and removing rows (``add_to_index()``, ``remove_from_index()``) and
keeping the index in step with its embeddings field, written as a mixin of
the index.
"""

from __future__ import annotations

import logging

import numpy as np

import eta.core.utils as etau
from fiftyone.brain.similarity import SimilarityIndex
import fiftyone.brain.internal.core.utils as fbu

from dinoprop.core import DinopropError

logger = logging.getLogger(__name__)

#: Stored vectors compared with the embeddings field when an index loads:
#: a change to more than about 2% of the vectors is caught with near
#: certainty (a re-embedding, another model) and the index is rebuilt.
STALE_PROBES = 256
_COMPACT_FRACTION = 0.3


class IndexUpdatesMixin:
    """The update methods of :class:`~dinoprop.similarity.DinopropSimilarityIndex`.

    Relies on the index's rows, ``_build()``, ``_prepare()``, ``_checked()``,
    ``_field_embeddings()``, ``_original_vectors()`` and ``_write_file()``.
    """

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
