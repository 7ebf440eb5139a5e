"""Operator ``compute_embeddings``: DINOv2 or DINOv3 embeddings of the target view."""

import os

import fiftyone.core.labels as fol
import fiftyone.operators.types as types

from . import _common

DEFAULT_MODEL = "dinov2-small"


class ComputeEmbeddings(_common.DinopropOperator):
    """Computes DINOv2 or DINOv3 embeddings (``dinoprop.compute_embeddings``)."""

    NAME = "compute_embeddings"
    LABEL = "dinoprop: compute DINOv2 / DINOv3 embeddings"
    DESCRIPTION = "Embeds images with DINOv2 or DINOv3 on the best device"
    #: Embedding 1000+ images defaults to a delegated run.
    DELEGATE_THRESHOLD = 1000
    CONFIG_OPTIONS = {"default_choice_to_delegated": True}
    TARGET_ACTION = "Embed"
    FORM_TITLE = "Compute DINOv2 / DINOv3 embeddings"
    PROGRESS_LABEL = "Embedding images"
    RESULT_TITLE = "Embeddings computed"
    RESULT_ROWS = [
        ("num_embedded", "Samples embedded", "int"),
        ("num_skipped", "Skipped (already embedded)", "int"),
        ("num_failed", "Failed", "int"),
        ("failure_report", "Failures", "str"),
        ("model", "Model", "str"),
        ("device", "Device", "str"),
        ("dim", "Dimension", "int"),
        ("images_per_second", "Images per second", "float"),
        ("seconds", "Seconds", "float"),
    ]

    def form(self, ctx, inputs, view):
        from dinoprop.models import MODEL_CHOICES, POOLINGS, model_label

        models = types.AutocompleteView()
        for name in MODEL_CHOICES:
            models.add_choice(name, label=model_label(name))
        model = ctx.params.get("model") or DEFAULT_MODEL
        model_error = _model_error(model)
        inputs.str(
            "model",
            default=DEFAULT_MODEL,
            label="Model",
            description=(
                "A built-in name, a Hugging Face model id, a local model "
                "directory or a Meta .pth checkpoint. DINOv3 models are gated: "
                "accept their licence on Hugging Face and set HF_TOKEN. "
                "Offline? efficientnet-lite0 ships with the 'offline' extra"
            ),
            view=models,
            invalid=model_error is not None,
            error_message=model_error or "",
        )

        patch_fields = _common.label_fields(view, (fol.Detections,))
        if patch_fields:
            _common.choice_input(
                inputs,
                "patches_field",
                patch_fields,
                "Object patches (optional)",
                description="Embed the boxes of this field instead of whole "
                "images: each box gets its own vector, which propagate_labels "
                "uses to label unlabeled boxes",
            )
        patches = ctx.params.get("patches_field") or None
        if patches:
            _common.choice_input(
                inputs,
                "patch_mode",
                {"crops": "crops: a forward pass per box",
                 "tokens": "tokens: one pass per image, tokens under each box pooled"},
                "Box embeddings",
                default="crops",
                description="Tokens are much faster with many boxes per "
                "image; crops see each object at full resolution",
            )

        field = ctx.params.get("embeddings_field") or _common.DEFAULT_EMBEDDINGS
        field_error = None if patches else _field_error(view, field)
        inputs.str(
            "embeddings_field",
            default=_common.DEFAULT_EMBEDDINGS,
            label="Embeddings attribute" if patches else "Embeddings field",
            description="The attribute of each box that stores its vector"
            if patches else "The sample field that stores the vectors",
            invalid=field_error is not None,
            error_message=field_error or "",
        )
        inputs.bool(
            "overwrite",
            default=False,
            label="Recompute existing embeddings",
            description="Otherwise samples that already have one are skipped",
        )
        path = "%s.detections.%s" % (patches, field) if patches else field
        if field_error is None and not ctx.params.get("overwrite", False):
            done = view.count(path) if patches or view.get_field(field) else 0
            flip = bool(ctx.params.get("flip_average", False))
            if done and not _existing_ok(inputs, view, field, patches, path, model, flip):
                return False
            if done:
                _common.notice(
                    inputs,
                    "existing",
                    "%d %s already have embeddings in '%s' and will be "
                    "skipped" % (done, "boxes" if patches else "samples", path),
                )

        _common.choice_input(
            inputs,
            "pooling",
            POOLINGS,
            "Pooling",
            default="cls",
            description="How a ViT's tokens become one vector",
        )
        inputs.bool(
            "flip_average",
            default=False,
            label="Average with the mirror image",
            description="Each vector averages the image and its horizontal "
            "flip: twice the compute, vectors that ignore which way objects face",
        )
        inputs.int(
            "batch_size",
            min=1,
            label="Batch size",
            description="Leave empty to pick one for the device",
        )
        if _common.engine_choice(
            ctx,
            inputs,
            "A Ray cluster embeds on all its machines; every node needs "
            "fiftyone-dinoprop[scale], the images at the same paths and this "
            "dataset's MongoDB",
        ):
            return _ray_inputs(inputs, patches)
        inputs.str(
            "device",
            label="Device",
            description="e.g. cuda:0, mps, cpu; empty picks GPU, else MPS, "
            "else CPU",
        )
        return True

    def follow_up(self, ctx, results):
        """Reloads the dataset, and warns when some images failed."""
        if results.num_failed:
            yield ctx.ops.notify(results.failure_report(), variant="warning")
        yield from super().follow_up(ctx, results)

    def call(self, view, params, progress):
        import dinoprop

        ray_options = _common.ray_options(params)
        if ray_options:
            ray_options["num_gpus_per_worker"] = params.get("num_gpus_per_worker")
        else:
            ray_options["device"] = params.get("device") or None
        return dinoprop.compute_embeddings(
            view,
            model=params.get("model") or DEFAULT_MODEL,
            embeddings_field=params.get("embeddings_field")
            or _common.DEFAULT_EMBEDDINGS,
            batch_size=params.get("batch_size") or None,
            overwrite=bool(params.get("overwrite", False)),
            pooling=params.get("pooling") or "cls",
            flip_average=bool(params.get("flip_average", False)),
            patches_field=params.get("patches_field") or None,
            patch_mode=params.get("patch_mode") or "crops",
            progress=progress,
            **ray_options,
        )


def _ray_inputs(inputs, patches):
    """The Ray cluster's fields; blocks the form for object patches."""
    if patches:
        _common.warn(
            inputs,
            "engine",
            "The Ray engine embeds whole images",
            "Clear 'Object patches', or run on this machine",
        )
        return False
    _common.ray_cluster_inputs(
        inputs,
        "Embedding workers",
        "Ray actors, each holding the model; empty: one per GPU of the "
        "cluster, else half its CPUs",
    )
    inputs.float(
        "num_gpus_per_worker",
        min=0,
        label="GPUs per worker",
        description="Fractions share a GPU; empty: 1 when the cluster has "
        "GPUs, else 0",
    )
    _common.ray_notice(inputs)
    return True


def _existing_ok(inputs, view, field, patches, path, model, flip_average):
    """Blocks the form when the field holds another model's vectors, or
    vectors averaged (or not) with the mirror image unlike this run's."""
    from dinoprop.embeddings import get_embeddings_run, recorded_setting

    run = get_embeddings_run(view, field, patches)
    recorded_flip = run is not None and recorded_setting(run, "flip_average")
    if run is not None and run.get("model") == model and recorded_flip == flip_average:
        return True
    if run is None:
        origin = "vectors of unknown origin"
    elif run.get("model") != model:
        origin = "vectors from model '%s'" % run.get("model")
    else:
        origin = "vectors %s averaged with the mirror image" % (
            "already" if recorded_flip else "not"
        )
    _common.warn(
        inputs,
        "existing",
        "'%s' already holds %s" % (path, origin),
        "Tick 'Recompute existing embeddings' to replace them, or choose "
        "another field",
    )
    return False


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
    existing = view.get_field(field)
    if existing is None or _holds_vectors(existing):
        return None
    return "Field '%s' exists and holds %s, not vectors; choose another" % (
        field,
        type(existing).__name__,
    )


def _holds_vectors(field):
    """Whether a schema field can hold vectors (not, e.g., the tags list)."""
    import fiftyone.core.fields as fof

    if isinstance(field, (fof.VectorField, fof.ArrayField)):
        return True
    return isinstance(field, fof.ListField) and (
        field.field is None or isinstance(field.field, (fof.FloatField, fof.IntField))
    )
