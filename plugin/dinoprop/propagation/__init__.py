"""Label propagation on FiftyOne collections: seeds in, calibrated labels out.

:func:`propagate_labels` reads the seed labels of a view and the embeddings
of its samples (or of their object patches), propagates the seeds over the
kNN graph of the embeddings with a method of
:mod:`dinoprop.propagation_methods`, and writes one label with a calibrated
confidence per target. The run is recorded on the dataset like any FiftyOne
run (``dataset.list_runs()``, ``load_run_results()``, ``rename_run()``, and
``delete_run()``, which removes what the run wrote) and its
:class:`PropagationResults` estimate the accuracy of the labels it wrote.

One module per concern:

- :mod:`~dinoprop.propagation.api`: :func:`propagate_labels` and its
  argument checks;
- :mod:`~dinoprop.propagation.samples`: sample seeds, the cached kNN graph,
  writing sample labels and the review queue;
- :mod:`~dinoprop.propagation.objects`: the same for object patches;
- :mod:`~dinoprop.propagation.runs`: the FiftyOne run (config, cleanup,
  results and their quality estimates);
- :mod:`~dinoprop.propagation.common`: the names and tags they share.
"""

from dinoprop.propagation.api import check_output_field, propagate_labels
from dinoprop.propagation.common import (
    DEFAULT_TARGET_PRECISION,
    NEEDS_REVIEW_TAG,
    NUM_TOP_CLASSES,
    REVIEW_QUEUE_VIEW,
    RUN_TYPE,
    TOP_CONFIDENCES_ATTRIBUTE,
    TOP_LABELS_ATTRIBUTE,
)
from dinoprop.propagation.runs import (
    COMPLETE,
    WRITING,
    PropagationResults,
    PropagationRun,
    PropagationRunConfig,
    check_run_complete,
    newest_run_key,
    propagation_run_key,
    propagation_runs,
    run_is_complete,
    unfinished_run_message,
)
from dinoprop.propagation.samples import count_seeds, sample_graph

__all__ = [
    "COMPLETE",
    "WRITING",
    "DEFAULT_TARGET_PRECISION",
    "NEEDS_REVIEW_TAG",
    "NUM_TOP_CLASSES",
    "REVIEW_QUEUE_VIEW",
    "RUN_TYPE",
    "TOP_CONFIDENCES_ATTRIBUTE",
    "TOP_LABELS_ATTRIBUTE",
    "PropagationResults",
    "PropagationRun",
    "PropagationRunConfig",
    "check_output_field",
    "check_run_complete",
    "count_seeds",
    "newest_run_key",
    "propagate_labels",
    "propagation_run_key",
    "propagation_runs",
    "run_is_complete",
    "sample_graph",
    "unfinished_run_message",
]
