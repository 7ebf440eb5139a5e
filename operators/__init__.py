"""FiftyOne plugin entry point of ``@dinoprop/dinoprop``.

``fiftyone.yml`` names this file as the plugin's ``py_entry``; FiftyOne loads
it as a package, calls :func:`register`, and the operators (one module per
user action, thin wrappers over the SDK) register themselves.

The SDK is importable either because the project was pip-installed or, when
the repository was only downloaded as a plugin, from ``plugin/`` next to
this folder. (The entry point lives here rather than in a root
``__init__.py`` so that the repository root is not a Python package, which
would confuse pytest.)
"""

import os
import sys

try:
    import dinoprop  # noqa: F401
except ImportError:
    sys.path.insert(
        0,
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "plugin",
        ),
    )

from .accept_propagated_labels import AcceptPropagatedLabels  # noqa: E402
from .compute_embeddings import ComputeEmbeddings  # noqa: E402
from .compute_similarity import ComputeSimilarity  # noqa: E402
from .compute_visualization import ComputeVisualization  # noqa: E402
from .open_review_queue import OpenReviewQueue  # noqa: E402
from .label_selected_samples import LabelSelectedSamples  # noqa: E402
from .label_studio import LoadReviewedLabels, SendToLabelStudio  # noqa: E402
from .loop_panel import LoopPanel  # noqa: E402
from .propagate_labels import PropagateLabels  # noqa: E402
from .suggest_seeds import SuggestSeeds  # noqa: E402
from .triage_panel import TriagePanel  # noqa: E402

#: The operator classes this plugin registers, in workflow order.
OPERATORS = [
    ComputeEmbeddings,
    ComputeSimilarity,
    ComputeVisualization,
    PropagateLabels,
    SuggestSeeds,
    OpenReviewQueue,
    AcceptPropagatedLabels,
    LabelSelectedSamples,
    SendToLabelStudio,
    LoadReviewedLabels,
]

#: The panel classes: the annotation loop in the grid, triage in the modal.
PANELS = [LoopPanel, TriagePanel]


def register(plugin):
    """Registers every dinoprop operator and panel with FiftyOne."""
    for operator_cls in OPERATORS + PANELS:
        plugin.register(operator_cls)
