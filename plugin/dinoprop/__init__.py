"""dinoprop: turn a few labeled images into a labeled FiftyOne dataset.

Public API (each function takes any FiftyOne dataset or view)::

    import dinoprop as dp

    dp.compute_embeddings(samples, model="dinov2-small")
    dp.compute_similarity(samples)
    dp.compute_visualization(samples)
    results = dp.propagate_labels(samples, "label")
    dp.suggest_seeds(samples, 10, label_field="label")

Heavy dependencies (torch, transformers, faiss, umap, FiftyOne itself) are
imported lazily on first use, so ``import dinoprop`` is fast.

Importing dinoprop also registers its faiss similarity backend with
FiftyOne Brain under the name ``"dinoprop"``, so
``fob.compute_similarity(..., backend="dinoprop")`` works without editing
any config file.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

#: The name of dinoprop's FiftyOne Brain similarity backend.
SIMILARITY_BACKEND = "dinoprop"
_SIMILARITY_CONFIG_CLS = "dinoprop.similarity.DinopropSimilarityConfig"

_LAZY_ATTRS = {
    "compute_embeddings": "dinoprop.embeddings",
    "compute_similarity": "dinoprop.similarity",
    "compute_visualization": "dinoprop.visualization",
    "propagate_labels": "dinoprop.propagation",
    "suggest_seeds": "dinoprop.seeds",
    "load_model": "dinoprop.models",
    "DinopropError": "dinoprop.core",
}

__all__ = sorted(_LAZY_ATTRS) + ["SIMILARITY_BACKEND", "register_backend"]


def __getattr__(name):
    module_name = _LAZY_ATTRS.get(name)
    if module_name is None:
        raise AttributeError("module 'dinoprop' has no attribute %r" % name)
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRS))


def register_backend() -> None:
    """Registers dinoprop's similarity backend with FiftyOne Brain.

    Called on ``import dinoprop``. If FiftyOne Brain is already imported, its
    live config is updated; otherwise FiftyOne Brain's documented environment
    variables (``FIFTYONE_BRAIN_SIMILARITY_BACKENDS`` and
    ``FIFTYONE_BRAIN_SIMILARITY_DINOPROP_CONFIG_CLS``) are set, which also
    reach processes started from this one, such as the App server.
    """
    backends = os.environ.get("FIFTYONE_BRAIN_SIMILARITY_BACKENDS", "*")
    names = [b for b in backends.split(",") if b]
    if SIMILARITY_BACKEND not in names:
        os.environ["FIFTYONE_BRAIN_SIMILARITY_BACKENDS"] = ",".join(
            names + [SIMILARITY_BACKEND]
        )
    os.environ.setdefault(
        "FIFTYONE_BRAIN_SIMILARITY_DINOPROP_CONFIG_CLS", _SIMILARITY_CONFIG_CLS
    )
    brain = sys.modules.get("fiftyone.brain")
    brain_config = getattr(brain, "brain_config", None)
    if brain_config is not None:
        brain_config.similarity_backends.setdefault(
            SIMILARITY_BACKEND, {"config_cls": _SIMILARITY_CONFIG_CLS}
        )


register_backend()
