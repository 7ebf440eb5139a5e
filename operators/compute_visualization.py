"""Operator ``compute_visualization``: a UMAP map for the Embeddings panel."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import _common

#: Mapping 20k+ vectors defaults to a delegated run.
DELEGATE_THRESHOLD = 20_000
DEFAULT_BRAIN_KEY = "dinoprop_umap"
METHODS = ("umap", "pca")


class ComputeVisualization(foo.Operator):
    """Computes a 2D/3D map (``dinoprop.compute_visualization``)."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="compute_visualization",
            label="dinoprop: compute UMAP visualization",
            description="Maps embeddings to 2D for the Embeddings panel",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = _common.target_view(ctx, inputs, "Map")
        embeddings = _common.field_dropdown(
            ctx,
            inputs,
            "embeddings",
            _common.vector_fields(view),
            "Embeddings field",
            "The vectors to map",
            default=_common.DEFAULT_EMBEDDINGS,
            missing="No embeddings yet: run compute_embeddings first",
            required=False,
        )
        if embeddings is None:
            return types.Property(inputs)

        _common.brain_key_input(
            ctx, inputs, view, DEFAULT_BRAIN_KEY, "visualization"
        )
        methods = types.DropdownView()
        for method in METHODS:
            methods.add_choice(method, label=method.upper())
        inputs.enum(
            "method",
            methods.values(),
            default="umap",
            label="Method",
            view=methods,
        )
        dims = types.RadioGroup(orientation="horizontal")
        dims.add_choice(2, label="2D")
        dims.add_choice(3, label="3D")
        inputs.enum(
            "num_dims", dims.values(), default=2, label="Dimensions", view=dims
        )
        inputs.int(
            "seed",
            default=51,
            label="Random seed",
            description="The same seed gives the same map",
        )
        _common.delegation(ctx, inputs, view, DELEGATE_THRESHOLD)
        return types.Property(
            inputs, view=types.View(label="Compute a UMAP visualization")
        )

    def resolve_delegation(self, ctx):
        return _common.wants_delegation(ctx, DELEGATE_THRESHOLD)

    def execute(self, ctx):
        import dinoprop

        params = ctx.params
        view = ctx.target_view()

        def call(progress):
            return dinoprop.compute_visualization(
                view,
                embeddings=params.get("embeddings")
                or _common.DEFAULT_EMBEDDINGS,
                brain_key=params.get("brain_key") or DEFAULT_BRAIN_KEY,
                method=params.get("method") or "umap",
                num_dims=int(params.get("num_dims") or 2),
                seed=params.get("seed", 51),
                progress=progress,
            )

        return _common.run(ctx, self, "Computing the map", call, _show_map)

    def resolve_output(self, ctx):
        return _common.summary_output(
            "Visualization computed",
            [
                ("brain_key", "Brain key", "str"),
                ("method", "Method", "str"),
                ("num_points", "Points", "int"),
                ("num_dims", "Dimensions", "int"),
                ("seconds", "Seconds", "float"),
            ],
        )


def _show_map(ctx, results):
    yield ctx.ops.reload_dataset()
    yield ctx.ops.open_panel(
        "Embeddings",
        layout="horizontal",
        is_active=True,
        state={"openKey": results.key},
    )
