"""Operator ``compute_visualization``: a UMAP map for the Embeddings panel."""

import fiftyone.operators.types as types

from . import _common

DEFAULT_BRAIN_KEY = "dinoprop_umap"
METHODS = ("umap", "pca")


class ComputeVisualization(_common.DinopropOperator):
    """Computes a 2D/3D map (``dinoprop.compute_visualization``)."""

    NAME = "compute_visualization"
    LABEL = "dinoprop: compute UMAP visualization"
    DESCRIPTION = "Maps embeddings to 2D for the Embeddings panel"
    #: Mapping 20k+ vectors defaults to a delegated run.
    DELEGATE_THRESHOLD = 20_000
    TARGET_ACTION = "Map"
    FORM_TITLE = "Compute a UMAP visualization"
    PROGRESS_LABEL = "Computing the map"
    RESULT_TITLE = "Visualization computed"
    RESULT_ROWS = [
        ("brain_key", "Brain key", "str"),
        ("method", "Method", "str"),
        ("num_points", "Points", "int"),
        ("num_dims", "Dimensions", "int"),
        ("seconds", "Seconds", "float"),
    ]

    def form(self, ctx, inputs, view):
        embeddings = _common.embeddings_dropdown(
            ctx, inputs, view, "The vectors to map"
        )
        if embeddings is None:
            return False
        _common.brain_key_input(
            ctx, inputs, view, DEFAULT_BRAIN_KEY, "visualization"
        )
        _common.choice_input(
            inputs,
            "method",
            {method: method.upper() for method in METHODS},
            "Method",
            default="umap",
        )
        from dinoprop.visualization import UMAP_MIN_POINTS

        embedded = view.exists(embeddings).count()
        if (ctx.params.get("method") or "umap") == "umap" and embedded < UMAP_MIN_POINTS:
            _common.warn(
                inputs, "too_few",
                "UMAP needs at least %d embedded samples; this view has %d "
                "(choose PCA, or a larger view)" % (UMAP_MIN_POINTS, embedded),
            )
            return False
        _common.choice_input(
            inputs,
            "num_dims",
            {2: "2D", 3: "3D"},
            "Dimensions",
            view=types.RadioGroup(orientation="horizontal"),
            default=2,
        )
        inputs.int(
            "seed",
            default=51,
            label="Random seed",
            description="The same seed gives the same map",
        )
        return True

    def call(self, view, params, progress):
        import dinoprop

        return dinoprop.compute_visualization(
            view,
            embeddings=params.get("embeddings") or _common.DEFAULT_EMBEDDINGS,
            brain_key=params.get("brain_key") or DEFAULT_BRAIN_KEY,
            method=params.get("method") or "umap",
            num_dims=int(params.get("num_dims") or 2),
            seed=params.get("seed", 51),
            progress=progress,
        )

    def follow_up(self, ctx, results):
        yield ctx.ops.reload_dataset()
        yield ctx.ops.open_panel(
            "Embeddings",
            layout="horizontal",
            is_active=True,
            state={"openKey": results.key},
        )
