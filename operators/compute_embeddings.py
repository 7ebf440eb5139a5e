"""Operator ``compute_embeddings``: DINOv2 embeddings of the target view."""

import os

import fiftyone.operators.types as types

from . import _common

DEFAULT_MODEL = "dinov2-small"


class ComputeEmbeddings(_common.DinopropOperator):
    """Computes DINOv2 embeddings (``dinoprop.compute_embeddings``)."""

    NAME = "compute_embeddings"
    LABEL = "dinoprop: compute DINOv2 embeddings"
    DESCRIPTION = "Embeds images with DINOv2 on the best device"
    #: Embedding 1000+ images defaults to a delegated run.
    DELEGATE_THRESHOLD = 1000
    CONFIG_OPTIONS = {"default_choice_to_delegated": True}
    TARGET_ACTION = "Embed"
    FORM_TITLE = "Compute DINOv2 embeddings"
    PROGRESS_LABEL = "Embedding images"
    RESULT_TITLE = "Embeddings computed"
    RESULT_ROWS = [
        ("num_embedded", "Samples embedded", "int"),
        ("num_skipped", "Skipped (already embedded)", "int"),
        ("num_failed", "Failed", "int"),
        ("model", "Model", "str"),
        ("device", "Device", "str"),
        ("dim", "Dimension", "int"),
        ("images_per_second", "Images per second", "float"),
        ("seconds", "Seconds", "float"),
    ]

    def form(self, ctx, inputs, view):
        from dinoprop.models import MODEL_CHOICES, POOLINGS

        models = types.AutocompleteView()
        for name in MODEL_CHOICES:
            models.add_choice(name, label=name)
        model = ctx.params.get("model") or DEFAULT_MODEL
        model_error = _model_error(model)
        inputs.str(
            "model",
            default=DEFAULT_MODEL,
            label="Model",
            description=(
                "A built-in name, a Hugging Face model id or a local model "
                "directory. Offline? efficientnet-lite0 ships with the "
                "'offline' extra"
            ),
            view=models,
            invalid=model_error is not None,
            error_message=model_error or "",
        )

        field = ctx.params.get("embeddings_field") or _common.DEFAULT_EMBEDDINGS
        field_error = _field_error(view, field)
        inputs.str(
            "embeddings_field",
            default=_common.DEFAULT_EMBEDDINGS,
            label="Embeddings field",
            description="The sample field that stores the vectors",
            invalid=field_error is not None,
            error_message=field_error or "",
        )
        inputs.bool(
            "overwrite",
            default=False,
            label="Recompute existing embeddings",
            description="Otherwise samples that already have one are skipped",
        )
        if field_error is None and view.get_field(field) is not None:
            done = view.exists(field).count()
            if done and not ctx.params.get("overwrite", False):
                _common.notice(
                    inputs,
                    "existing",
                    "%d of %d samples already have embeddings in '%s' and "
                    "will be skipped" % (done, view.count(), field),
                )

        _common.choice_input(
            inputs,
            "pooling",
            POOLINGS,
            "Pooling",
            default="cls",
            description="How a ViT's tokens become one vector",
        )
        inputs.int(
            "batch_size",
            min=1,
            label="Batch size",
            description="Leave empty to pick one for the device",
        )
        inputs.str(
            "device",
            label="Device",
            description="e.g. cuda:0, mps, cpu; empty picks GPU, else MPS, "
            "else CPU",
        )
        return True

    def call(self, view, params, progress):
        import dinoprop

        return dinoprop.compute_embeddings(
            view,
            model=params.get("model") or DEFAULT_MODEL,
            embeddings_field=params.get("embeddings_field")
            or _common.DEFAULT_EMBEDDINGS,
            batch_size=params.get("batch_size") or None,
            device=params.get("device") or None,
            overwrite=bool(params.get("overwrite", False)),
            pooling=params.get("pooling") or "cls",
            progress=progress,
        )


def _model_error(model):
    from dinoprop.models import MODEL_CHOICES

    if model in MODEL_CHOICES:
        return None
    path = os.path.expanduser(model)
    if os.path.isabs(path) or model.startswith("."):
        if not os.path.exists(path):
            return "No such model file or directory: %s" % model
    return None


def _field_error(view, field):
    import fiftyone.core.fields as fof

    existing = view.get_field(field)
    if existing is None or isinstance(
        existing, (fof.VectorField, fof.ArrayField, fof.ListField)
    ):
        return None
    return "Field '%s' exists and holds %s, not vectors; choose another" % (
        field,
        type(existing).__name__,
    )
