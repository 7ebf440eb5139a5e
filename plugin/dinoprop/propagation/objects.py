"""Propagation over object patches: boxes in, a Detections copy out."""

from __future__ import annotations

import numpy as np

from dinoprop import propagation_methods as pm
from dinoprop.core import DinopropError, check_finite
from dinoprop.propagation.common import _check_seeds, _flatten, _fol, _is_seed
from dinoprop.propagation.samples import _mark_for_review
from dinoprop.vector_reads import decode_vector


def _object_data(samples, label_field, embeddings, seed_tag, k):
    from dinoprop.graph import knn_search

    path = label_field + ".detections."
    sample_ids, det_ids, labels, tags, vectors = samples.values(
        ["id", path + "id", path + "label", path + "tags", path + embeddings]
    )
    owner = np.array(
        [sid for sid, dets in zip(sample_ids, det_ids) for _ in (dets or [])]
    )
    det_ids, labels, tags, vectors = (
        _flatten(v) for v in (det_ids, labels, tags, vectors)
    )
    vectors = [None if v is None else decode_vector(v) for v in vectors]
    has_embedding = np.array([v is not None for v in vectors], bool)
    if not has_embedding.any():
        raise DinopropError(
            "No object in '%s' has an embedding in its attribute '%s'; run "
            "dinoprop.compute_embeddings(..., patches_field='%s') first, or "
            "pass the attribute holding the patch embeddings as embeddings="
            % (label_field, embeddings, label_field)
        )
    is_seed = np.array(
        [_is_seed(lab, t, seed_tag) for lab, t in zip(labels, tags)],
        bool,
    )
    where = "object in '%s' has a label%s" % (
        label_field,
        "" if seed_tag is None else " and the tag '%s'" % seed_tag,
    )
    _check_seeds(
        [lab for lab, s in zip(labels, is_seed) if s], has_embedding[is_seed], where
    )
    keep = np.flatnonzero(has_embedding)
    if len(keep) == int(is_seed.sum()):
        raise DinopropError(
            "Every object with an embedding is a seed: there is nothing to "
            "propagate to"
        )
    matrix = np.stack([np.asarray(vectors[i], np.float32) for i in keep])
    check_finite(matrix, np.array(det_ids)[keep], embeddings)
    neighbors, sims = knn_search(matrix, k)
    seed_idx = np.flatnonzero(is_seed[keep])
    return {
        "ids": np.array(det_ids)[keep],
        "owners": owner[keep],
        "embeddings": matrix,
        "graph": pm.Graph(neighbors, sims),
        "seed_idx": seed_idx,
        "seed_labels": np.array([labels[i] for i in keep[seed_idx]]),
        "label_field": label_field,
    }


def _write_objects(
    samples, data, output_field, targets, classes, probs, needs_review,
    store_scores,
):
    """Writes a Detections copy of every target box; returns #to review."""
    from fiftyone import ViewField as F

    fol = _fol()
    predicted = {}
    best = probs.argmax(axis=1)
    for row, node in enumerate(targets):
        predicted[data["ids"][node]] = (row, best[row])
    sample_ids, detections = samples.values(
        ["id", data["label_field"] + ".detections"]
    )
    values = {}
    for sid, dets in zip(sample_ids, detections):
        out = []
        for det in dets or []:
            if det.id not in predicted:
                continue
            row, cls = predicted[det.id]
            copy = fol.Detection(
                label=str(classes[cls]),
                confidence=float(probs[row, cls]),
                bounding_box=det.bounding_box,
                source_id=det.id,
            )
            if store_scores:
                copy.logits = np.log(np.clip(probs[row], 1e-12, None)).astype(float)
            out.append(copy)
        values[sid] = fol.Detections(detections=out)
    # the labels are built here, so FiftyOne need not validate each one
    samples.set_values(output_field, values, key_field="id", validate=False)
    review_ids = sorted(set(data["owners"][targets[needs_review]]))
    confidences = F(output_field + ".detections.confidence")
    _mark_for_review(samples, review_ids, output_field, confidences.min())
    return len(review_ids), None
