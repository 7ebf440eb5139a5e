"""FiftyOne plugin entry point of ``@dinoprop/dinoprop``.

FiftyOne loads this file when it finds ``fiftyone.yml`` in its plugins
directory. The operators are thin wrappers over the ``dinoprop`` SDK, which
is importable either because the project was pip-installed or, when the
repository was only downloaded as a plugin, from ``plugin/`` beside this file.
"""

import os
import sys

try:
    import dinoprop  # noqa: F401
except ImportError:
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin")
    )

from .operators import OPERATORS  # noqa: E402


def register(plugin):
    """Registers every dinoprop operator with FiftyOne."""
    for operator_cls in OPERATORS:
        plugin.register(operator_cls)
