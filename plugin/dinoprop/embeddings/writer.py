"""The FiftyOne side of the embedding loop: the engine's vectors, buffered
and committed to the database in bulk chunks, and failures recorded."""

from __future__ import annotations

import logging
import time
from typing import Any

from dinoprop.core import DinopropError, progress_bar

logger = logging.getLogger(__name__)

#: Default number of samples committed to the database per write.
DEFAULT_CHUNK_SIZE = 1024

#: Buffered results are also committed after this many seconds, so an
#: interruption (even ``kill -9``) loses at most about this much work plus
#: one batch. One bulk write every 2 s costs well under 1% of the run time.
FLUSH_SECONDS = 2.0

#: Failed images named in the warning and the result panel.
FAILURE_EXAMPLES = 5


def _write_chunk(dataset: Any, path: str, values: dict, label_values: bool) -> None:
    """Commits one chunk of vectors (``{sample or label ID: vector}``).

    Sample vectors go to the declared field through
    :func:`dinoprop.label_writes.write_vectors` (unordered bulk updates in
    FiftyOne's own format); vectors of patches inside label lists through
    FiftyOne's ``set_label_values``.
    """
    if label_values:
        dataset.set_label_values(path, values)
        return
    import fiftyone.core.sample as fos

    from dinoprop.label_writes import write_vectors

    write_vectors(dataset._sample_collection, path, list(values), list(values.values()))
    fos.Sample._reload_docs(dataset._sample_collection_name, sample_ids=list(values))


class _Runner:
    """Drives one embeddings call: pending samples → engine → buffered bulk
    writes."""

    def __init__(self, samples, engine, settings, results, skip_failures, chunk_size):
        self.samples = samples
        self.dataset = samples._dataset
        self.engine = engine
        self.settings = settings
        self.results = results
        self.skip_failures = skip_failures
        self.chunk_size = chunk_size
        self._buffer: dict = {}
        self._last_flush = time.monotonic()

    def embed_images(self, overwrite, progress) -> None:
        field_name = self.settings["embeddings_field"]
        todo = self.samples if overwrite else self.samples.exists(field_name, False)
        ids, filepaths = todo.values(["id", "filepath"]) if len(todo) else ([], [])
        self.results.num_skipped = len(self.samples) - len(ids)
        if not ids:
            return
        self._declare_vector_field(field_name)
        self._run(filepaths, None, ids, progress, field_name, ids, False)

    def embed_patches(self, path, overwrite, progress) -> None:
        sample_ids, filepaths, boxes, label_ids, skipped = _collect_boxes(
            self.samples, self.settings["patches_field"], path, overwrite
        )
        self.results.num_skipped = skipped
        if not sample_ids:
            return
        self._declare_vector_field(path)
        self._run(filepaths, boxes, sample_ids, progress, path, label_ids, True)

    def _run(self, filepaths, boxes, sample_ids, progress, path, keys, labels):
        with progress_bar(len(filepaths), progress=progress, iters_str="images") as pb:
            try:
                for batch in self.engine.run(filepaths, boxes=boxes):
                    self._record_failures(batch.failures, sample_ids, filepaths)
                    if batch.indices:
                        self._buffer_vectors(batch, keys, labels)
                    pb.update(len(batch.indices) + len(batch.failures))
                    self._maybe_flush(path, labels)
            except BaseException:  # Ctrl-C or an error: keep what was computed
                self._flush_after_error(path, labels)
                raise
        self._flush(path, labels)

    def _buffer_vectors(self, batch, keys, labels) -> None:
        offset, vectors = 0, batch.vectors
        for index, count in zip(batch.indices, batch.counts):
            if labels:
                for label_id, vector in zip(keys[index], vectors[offset : offset + count]):
                    self._buffer[label_id] = vector
            else:
                self._buffer[keys[index]] = vectors[offset]
            offset += count

    def _record_failures(self, failures, sample_ids, filepaths) -> None:
        from dinoprop.embeddings_data import failure_kind

        results = self.results
        for index, reason in failures:
            failure = (sample_ids[index], reason)
            results.failures.append(failure)
            results.num_failed += 1
            kind = failure_kind(reason)
            results.failure_counts[kind] = results.failure_counts.get(kind, 0) + 1
            if len(results.failure_examples) < FAILURE_EXAMPLES:
                results.failure_examples.append("%s (%s)" % (filepaths[index], reason))
            if not self.skip_failures:
                raise DinopropError(
                    "Cannot embed sample %s: %s (pass skip_failures=True to "
                    "skip such samples)" % failure
                )

    def _maybe_flush(self, path, labels) -> None:
        due = time.monotonic() - self._last_flush > FLUSH_SECONDS
        if len(self._buffer) >= self.chunk_size or (self._buffer and due):
            self._flush(path, labels)

    def _flush(self, path, labels) -> None:
        """Commits the buffered vectors; ``num_embedded`` counts committed ones."""
        if self._buffer:
            _write_chunk(self.dataset, path, self._buffer, labels)
            self.results.num_embedded += len(self._buffer)
            self._buffer = {}
        self._last_flush = time.monotonic()

    def _flush_after_error(self, path, labels) -> None:
        """Commits what was computed before an error, which is then re-raised."""
        try:
            self._flush(path, labels)
        except Exception:  # the database may be what failed
            logger.warning(
                "Could not commit the %d vectors computed before the error",
                len(self._buffer), exc_info=True,
            )

    def _declare_vector_field(self, field_name) -> None:
        import fiftyone as fo

        if self.dataset.get_field(field_name) is None:
            self.dataset.add_sample_field(
                field_name, fo.VectorField,
                description="dinoprop %s embeddings (%s pooling)"
                % (self.settings["model"], self.settings["pooling"]),
            )


def _collect_boxes(samples, patches_field, path, overwrite):
    """The boxes still to embed, grouped by sample."""
    import fiftyone.core.labels as fol

    list_field = path.split(".")[1]
    label_cls = samples.get_field(patches_field).document_type
    prefix = "%s.%s." % (patches_field, list_field)
    geometry = prefix + ("bounding_box" if label_cls is fol.Detections else "points")
    attr = path
    ids, filepaths, label_ids, shapes, existing = samples.values(
        ["id", "filepath", prefix + "id", geometry, attr]
    )
    out = ([], [], [], [])
    skipped = 0
    for sid, filepath, lids, geoms, vecs in zip(ids, filepaths, label_ids, shapes, existing):
        todo = [
            (lid, _as_box(g)) for lid, g, v in zip(lids or [], geoms or [], vecs or [])
            if (overwrite or v is None) and _as_box(g) is not None
        ]
        skipped += len(lids or []) - len(todo)
        if todo:
            out[0].append(sid)
            out[1].append(filepath)
            out[2].append([b for _, b in todo])
            out[3].append([lid for lid, _ in todo])
    return out[0], out[1], out[2], out[3], skipped


def _as_box(geometry):
    """A relative ``[x, y, w, h]`` box from a bounding box or polyline points."""
    if not geometry:
        return None
    if isinstance(geometry[0], (int, float)):
        return list(geometry) if len(geometry) == 4 else None
    points = [p for shape in geometry for p in shape]
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
