"""Shared validation, field access and progress helpers used by every module.

Everything here imports FiftyOne lazily so that ``import dinoprop`` stays fast.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from dinoprop.bulk_reads import gc_paused
from dinoprop.vector_reads import read_vectors

#: Prefix of every tag dinoprop writes on samples.
TAG_PREFIX = "dinoprop:"

#: The tag :func:`dinoprop.suggest_seeds` puts on the samples it suggests.
ANNOTATE_NEXT_TAG = TAG_PREFIX + "annotate_next"


class DinopropError(ValueError):
    """Raised for invalid user input; the message says what to change."""


def check_field_name(name: Any, what: str) -> None:
    """Checks that ``name`` can be a new top-level field (or attribute).

    Args:
        name: the proposed name
        what: the argument's name, for the message (e.g. ``"output_field"``)

    Raises:
        DinopropError: if ``name`` is empty, nested (contains ``.``), or
            starts with ``_`` or ``$`` (reserved by FiftyOne and MongoDB)
    """
    if (
        not isinstance(name, str)
        or not name
        or "." in name
        or name[0] in "_$"
    ):
        raise DinopropError(
            "%s must be a top-level field name (no '.', not starting with "
            "'_' or '$'); got %r" % (what, name)
        )


def check_int(value: Any, name: str, minimum: int = 1) -> None:
    """Checks that ``value`` is an integer of at least ``minimum``.

    Booleans are refused: ``k=True`` is a mistake, not ``k=1``.

    Args:
        value: the argument
        name: its name, for the message
        minimum: the smallest value allowed

    Raises:
        DinopropError: if ``value`` is not an integer (or is a bool) or is
            below ``minimum``
    """
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        wanted = "a positive integer" if minimum == 1 else "an integer >= %d" % minimum
        raise DinopropError("%s must be %s; got %r" % (name, wanted, value))


def check_number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> None:
    """Checks that ``value`` is a real number in ``[low, high]`` (or
    ``(low, high]`` with ``low_open``); booleans and NaN are refused.

    Raises:
        DinopropError: if it is not
    """
    ok = (
        not isinstance(value, (bool, np.bool_))
        and isinstance(value, (int, float, np.integer, np.floating))
        and (low < value if low_open else low <= value)
        and value <= high
    )
    if not ok:
        raise DinopropError(
            "%s must be a number in %s%g, %g]; got %r"
            % (name, "(" if low_open else "[", low, high, value)
        )


def check_finite(vectors: np.ndarray, ids: Any, field: str) -> None:
    """Raises when some embeddings hold NaN or infinite values.

    Args:
        vectors: a ``num x dim`` array
        ids: the ``num`` sample (or label) IDs of its rows
        field: the embeddings field, for the message

    Raises:
        DinopropError: naming how many samples are affected, the first few
            IDs, and how to fix them
    """
    bad = ~np.isfinite(vectors).all(axis=1) if len(vectors) else np.zeros(0, bool)
    if not bad.any():
        return
    first = [str(i) for i in np.asarray(ids)[bad][:5]]
    raise DinopropError(
        "%d of the %d embeddings in '%s' hold NaN or infinite values (first "
        "IDs: %s). Recompute them, e.g. dinoprop.compute_embeddings("
        "dataset.select(ids), embeddings_field=%r, overwrite=True), or clear "
        "them (set the field to None) to leave those samples out"
        % (int(bad.sum()), len(vectors), field, ", ".join(first), field)
    )


def check_brain_key(
    samples: Any, brain_key: Any, run_type: str, overwrite: bool = True
) -> bool:
    """Checks that a brain run of ``run_type`` may be stored under a key.

    Args:
        samples: a FiftyOne dataset or view (its dataset's runs are checked)
        brain_key: the key
        run_type: the run type to store, e.g. ``"similarity"`` or
            ``"visualization"``
        overwrite: whether an existing run of the same type may be replaced

    Returns:
        whether a run of that type exists under the key (and will be
        replaced)

    Raises:
        DinopropError: if the key is not a Python identifier, names a run of
            another type, or names a run and ``overwrite`` is False
    """
    if not isinstance(brain_key, str) or not brain_key.isidentifier():
        raise DinopropError(
            "Invalid brain_key %r; keys must be valid Python identifiers "
            "(letters, digits and underscores, not starting with a digit)"
            % (brain_key,)
        )
    dataset = samples._root_dataset
    if brain_key not in dataset.list_brain_runs():
        return False
    existing = getattr(dataset.get_brain_info(brain_key).config, "type", None)
    if existing != run_type:
        raise DinopropError(
            "Brain key '%s' holds a %s run; choose another key, so that it is "
            "not lost" % (brain_key, existing)
        )
    if not overwrite:
        raise DinopropError(
            "Brain key '%s' already exists; pass overwrite=True or choose "
            "another key" % brain_key
        )
    return True


def validate_samples(samples: Any, require_images: bool = True) -> None:
    """Checks that ``samples`` is a non-empty FiftyOne collection of images.

    Args:
        samples: a :class:`fiftyone.core.collections.SampleCollection`
        require_images: whether the collection must contain image samples

    Raises:
        DinopropError: if ``samples`` is not a collection, is empty, or holds
            another media type
    """
    import fiftyone.core.collections as foc

    if not isinstance(samples, foc.SampleCollection):
        raise DinopropError(
            "Expected a FiftyOne Dataset or DatasetView; found %s"
            % type(samples).__name__
        )
    if require_images and samples.media_type not in ("image", "group"):
        raise DinopropError(
            "dinoprop works on image datasets; '%s' has media type '%s'"
            % (samples._root_dataset.name, samples.media_type)
        )
    if len(samples) == 0:
        raise DinopropError(
            "The view is empty: there are no samples to process"
        )


def get_field(samples: Any, field: str) -> Any:
    """Returns the schema field ``field`` of ``samples``, or None if missing."""
    return samples.get_field(field)


def require_field(samples: Any, field: str, kind: str) -> Any:
    """Returns the schema field ``field``, raising a clear error if missing.

    Args:
        samples: a sample collection
        field: the field name
        kind: a human description of what the field should hold

    Returns:
        the :class:`fiftyone.core.fields.Field`
    """
    schema_field = get_field(samples, field)
    if schema_field is None:
        raise DinopropError(
            "Field '%s' does not exist on dataset '%s'; expected %s"
            % (field, samples._root_dataset.name, kind)
        )
    return schema_field


def require_label_field(samples: Any, field: str, label_types: tuple) -> type:
    """Checks that ``field`` is a label field of one of ``label_types``.

    Args:
        samples: a sample collection
        field: the label field name
        label_types: a tuple of :class:`fiftyone.core.labels.Label` classes

    Returns:
        the label class of the field
    """
    import fiftyone.core.fields as fof

    names = " or ".join(t.__name__ for t in label_types)
    schema_field = require_field(samples, field, "a %s field" % names)
    doc_type = getattr(schema_field, "document_type", None)
    if not isinstance(schema_field, fof.EmbeddedDocumentField) or not (
        doc_type and issubclass(doc_type, label_types)
    ):
        raise DinopropError(
            "Field '%s' has type %s; expected a %s field"
            % (field, _describe_field(schema_field), names)
        )
    return doc_type


def check_vector_field(samples: Any, field: str) -> None:
    """Raises if ``field`` exists and cannot hold embedding vectors."""
    import fiftyone.core.fields as fof

    schema_field = get_field(samples, field)
    if schema_field is not None and not isinstance(
        schema_field, (fof.VectorField, fof.ArrayField, fof.ListField)
    ):
        raise DinopropError(
            "Field '%s' already exists with type %s and cannot hold "
            "embeddings; choose another field name"
            % (field, _describe_field(schema_field))
        )


def require_embeddings_field(
    samples: Any, field: str, patches_field: Optional[str] = None
) -> int:
    """Checks that ``field`` can hold the embeddings of samples or patches.

    For patches, ``field`` is the attribute of each label of
    ``patches_field`` holding its embedding; it is declared on the dataset
    as a vector field when labels carry it undeclared, so that FiftyOne
    Brain can read it.

    Args:
        samples: a sample collection
        field: the embeddings field (or label attribute)
        patches_field: an optional label list field such as ``Detections``

    Returns:
        the number of embeddings in ``samples``

    Raises:
        DinopropError: if a field is missing or has the wrong type
    """
    import fiftyone.core.fields as fof
    import fiftyone.core.labels as fol

    if patches_field is None:
        require_field(
            samples,
            field,
            "an embeddings field (run dinoprop.compute_embeddings first)",
        )
        check_vector_field(samples, field)
        return samples.exists(field).count()
    require_field(samples, patches_field, "a patches (label) field")
    label_type, path = samples._get_label_field_path(patches_field, field)
    if not issubclass(label_type, fol._LABEL_LIST_FIELDS):
        raise DinopropError(
            "patches_field '%s' must be a label list field such as "
            "Detections" % patches_field
        )
    count = samples.count(path)
    if count and not samples.has_field(path):
        samples._dataset.add_sample_field(path, fof.VectorField)
    return count


@gc_paused()
def load_embeddings(
    samples: Any, field: str, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Loads the embedding vectors stored in ``field``.

    Samples without an embedding are left out.

    Args:
        samples: a sample collection
        field: the name of a vector field
        allow_empty: return empty arrays, instead of raising, when no
            sample has an embedding

    Returns:
        a tuple ``(sample_ids, embeddings)``: a ``num`` array of sample IDs
        and a ``num x dim`` float32 array

    Raises:
        DinopropError: if the field is missing, has another type, holds no
            embedding (unless ``allow_empty``), or the vectors have
            inconsistent dimensions or hold NaN or infinite values
    """
    require_field(
        samples,
        field,
        "an embeddings field (run dinoprop.compute_embeddings first)",
    )
    check_vector_field(samples, field)
    sample_ids, embeddings = read_vectors(samples, field)
    if not len(sample_ids) and allow_empty:
        return np.array([], dtype=str), np.zeros((0, 0), np.float32)
    if not len(sample_ids):
        raise no_embeddings_error(field)
    if isinstance(embeddings, list):  # not all of one length
        dims = {len(v) for v in embeddings}
        if len(dims) > 1:
            raise DinopropError(
                "Embeddings in '%s' have mixed dimensions %s; recompute them "
                "with overwrite=True" % (field, sorted(dims))
            )
        embeddings = np.stack(embeddings)
    embeddings = embeddings.astype(np.float32, copy=False)
    check_finite(embeddings, sample_ids, field)
    return sample_ids, embeddings


def read_embeddings(
    samples: Any, field: str, patches_field: str | None = None, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Reads the sample or object-patch embeddings of a view.

    Sample embeddings are read by :func:`load_embeddings`; patch embeddings
    (``field`` on each label of ``patches_field``) by FiftyOne Brain's
    reader.

    Args:
        samples: a sample collection
        field: the embeddings field (for patches, the label attribute)
        patches_field: the Detections/Polylines field holding the patches
        allow_empty: return empty results, instead of raising, when nothing
            in the view has an embedding

    Returns:
        a tuple ``(vectors, sample_ids, label_ids)``: ``num x dim`` float32
        vectors, their sample IDs, and their label IDs (None for samples)

    Raises:
        DinopropError: if the embeddings cannot be read, have mixed
            dimensions, hold NaN or infinite values, or (unless
            ``allow_empty``) there are none
    """
    if patches_field is None:
        sample_ids, vectors = load_embeddings(samples, field, allow_empty=allow_empty)
        return vectors, sample_ids, None
    import fiftyone.brain.internal.core.utils as fbu

    try:
        vectors, sample_ids, label_ids = fbu.get_embeddings(
            samples, patches_field=patches_field, embeddings_field=field
        )
    except ValueError as e:
        raise DinopropError(
            "Cannot read embeddings '%s' (%s); do they all have the same "
            "dimension? Recompute them with overwrite=True" % (field, e)
        ) from e
    if len(vectors) == 0 and not allow_empty:
        raise no_embeddings_error(field)
    vectors = np.asarray(vectors, dtype=np.float32)
    check_finite(vectors, label_ids, field)
    return vectors, np.asarray(sample_ids), label_ids


def no_embeddings_error(field: str) -> DinopropError:
    """The error for a view where no sample has an embedding in ``field``."""
    return DinopropError(
        "No sample in the view has an embedding in '%s'; run "
        "dinoprop.compute_embeddings first" % field
    )


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS
    has one, as on Linux; otherwise every core)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def row_norms(x: np.ndarray) -> np.ndarray:
    """The L2 norm of every row of the 2-D array ``x``, without the
    ``N x D`` temporary of ``np.linalg.norm`` (1.5 GB at 1M x 384)."""
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def l2_normalize(x: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """Returns the rows of ``x`` scaled to unit L2 norm (zero rows kept).

    Args:
        x: a 2-D array
        norms: its :func:`row_norms`, when the caller has them already
    """
    norms = row_norms(x) if norms is None else norms
    return x / np.maximum(norms, 1e-12)[:, None]


def progress_bar(total: int, progress: Any = None, iters_str: str = "samples"):
    """Returns FiftyOne's progress bar.

    Args:
        total: the number of iterations
        progress: None (FiftyOne's default), a bool, or a callable receiving
            the progress bar on each update (what operators pass)
        iters_str: the unit shown in the bar

    Returns:
        a :class:`fiftyone.core.utils.ProgressBar`
    """
    import fiftyone.core.utils as fou

    return fou.ProgressBar(total=total, progress=progress, iters_str=iters_str)


def dataset_store(dataset: Any, name: str) -> Any:
    """The FiftyOne execution store ``name`` of ``dataset`` (created on first use).

    dinoprop keeps state that must outlive one operator run (labeling
    history, what was sent to an annotator) in FiftyOne's own per-dataset
    stores, so it is deleted with the dataset.

    Args:
        dataset: a :class:`fiftyone.core.dataset.Dataset`
        name: the store's name

    Returns:
        a :class:`fiftyone.operators.store.ExecutionStore`
    """
    from fiftyone.operators.store import ExecutionStore

    return ExecutionStore.create(name, dataset_id=dataset._doc.id)


def _describe_field(schema_field: Any) -> str:
    doc_type = getattr(schema_field, "document_type", None)
    if doc_type is not None:
        return doc_type.__name__
    return type(schema_field).__name__
