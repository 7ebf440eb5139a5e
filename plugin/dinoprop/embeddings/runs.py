"""Embeddings runs: the record of a field's model and settings, and the
check that one field never mixes two embedding spaces."""

from __future__ import annotations

import logging
import re
from typing import Any

from dinoprop.core import DinopropError

logger = logging.getLogger(__name__)

#: The run key prefix under which embeddings runs are recorded.
RUN_KEY_PREFIX = "dinoprop_embeddings_"

#: Settings that must match for stored embeddings to be reused.
_FINGERPRINT_KEYS = (
    "fingerprint", "pooling", "normalize", "flip_average", "patches_field", "patch_mode",
)

#: What runs recorded before a setting existed used for it.
_SETTING_DEFAULTS = {"flip_average": False, "patch_mode": "crops"}


def run_key_for(embeddings_field: str, patches_field: str | None = None) -> str:
    """The run key recording the model and settings of an embeddings field."""
    target = embeddings_field if patches_field is None else "%s_%s" % (patches_field, embeddings_field)
    return RUN_KEY_PREFIX + re.sub(r"\W", "_", target)


def get_embeddings_run(samples: Any, embeddings_field: str, patches_field: str | None = None) -> dict | None:
    """The recorded settings of the embeddings in a field, or None.

    Returns:
        a dict with ``model``, ``fingerprint``, ``pooling``, ``normalize``,
        ``dim``, ``status`` and more, or None if no run was recorded
    """
    run_key = run_key_for(embeddings_field, patches_field)
    if not samples.has_run(run_key):
        return None
    return dict(samples.get_run_info(run_key).config.serialize())


def _check_previous_run(samples, run_key, settings, target, overwrite) -> None:
    """Refuses to mix vectors from different models/settings in one field."""
    previous = None
    if samples.has_run(run_key):
        previous = samples.get_run_info(run_key).config.serialize()
    if previous is not None and all(
        recorded_setting(previous, k) == settings[k] for k in _FINGERPRINT_KEYS
    ):
        return
    if not _has_any_value(samples._dataset, target):
        return
    if overwrite:
        outside = samples._dataset.count(target) - samples.count(target)
        if outside > 0:
            raise DinopropError(
                "overwrite=True with other settings would leave %d vectors "
                "outside this view from the old ones in '%s', and the field "
                "would mix two embedding spaces; run it on the whole "
                "dataset, or choose another embeddings_field" % (outside, target)
            )
        return
    if previous is None:
        origin = "vectors from an unknown source (not recorded by dinoprop)"
    else:
        changed = [k for k in _FINGERPRINT_KEYS if recorded_setting(previous, k) != settings[k]]
        origin = "vectors from model '%s' with other settings (%s)" % (
            previous.get("model"), ", ".join(changed),
        )
    raise DinopropError(
        "Field '%s' already holds %s; pass overwrite=True to recompute them "
        "with '%s', or choose another embeddings_field" % (target, origin, settings["model"])
    )


def recorded_setting(run: dict, key: str) -> Any:
    """A setting of a recorded embeddings run (:func:`get_embeddings_run`),
    or its default for runs recorded before the setting existed."""
    return run.get(key, _SETTING_DEFAULTS.get(key))


def _has_any_value(dataset: Any, path: str) -> bool:
    """Whether any sample (or label) of the dataset has a value at ``path``."""
    if dataset.get_field(path) is None and "." not in path:
        return False
    return dataset.count(path) > 0


def _record_run(samples, run_key, settings, summary, status, results=None) -> None:
    """Records the field's model fingerprint and settings as a FiftyOne run
    (``summary``: :func:`dinoprop.models.model_summary` of the model)."""
    dataset = samples._dataset
    config = dataset.init_run(**{**summary, **settings, "status": status})
    if status == "running":
        dataset.register_run(run_key, config, overwrite=True, cleanup=False)
        return
    dataset.update_run_config(run_key, config)
    summary = {k: v for k, v in results.summary().items() if k != "run_key"}
    dataset.save_run_results(run_key, dataset.init_run_results(run_key, **summary))


def _record_failed_run(samples, run_key, settings, summary, results) -> None:
    """Records an interrupted run as ``failed`` with what it committed.

    The vectors already written stay (a rerun resumes from them); the run
    record says the field is incomplete instead of staying ``running``.
    Errors while recording are logged, so the original error is raised.
    """
    try:
        _record_run(samples, run_key, settings, summary, status="failed", results=results)
    except Exception:  # the database may be what failed
        logger.warning("Could not record the failed embeddings run '%s'", run_key, exc_info=True)
