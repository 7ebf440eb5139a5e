"""Operator ``compute_similarity``: a faiss similarity index of embeddings."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import _common

#: Indexing 100k+ vectors defaults to a delegated run.
DELEGATE_THRESHOLD = 100_000
DEFAULT_BRAIN_KEY = "dinoprop_similarity"
METRICS = ("cosine", "euclidean")
#: The index types dinoprop.compute_similarity supports.
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")


class ComputeSimilarity(foo.Operator):
    """Builds a similarity index (``dinoprop.compute_similarity``)."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="compute_similarity",
            label="dinoprop: build similarity index",
            description="faiss nearest-neighbour index for sort by similarity",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = _common.target_view(ctx, inputs, "Index")
        embeddings = _common.field_dropdown(
            ctx,
            inputs,
            "embeddings",
            _common.vector_fields(view),
            "Embeddings field",
            "The vectors to index",
            default=_common.DEFAULT_EMBEDDINGS,
            missing="No embeddings yet: run compute_embeddings first",
            required=False,
        )
        if embeddings is None:
            return types.Property(inputs)

        _common.brain_key_input(
            ctx, inputs, view, DEFAULT_BRAIN_KEY, "similarity"
        )
        kinds = types.DropdownView()
        for kind in INDEX_TYPES:
            kinds.add_choice(kind, label=kind)
        inputs.enum(
            "index_type",
            kinds.values(),
            default="auto",
            label="Index type",
            description="auto picks exact search for small datasets and an "
            "approximate index for large ones",
            view=kinds,
        )
        metrics = types.DropdownView()
        for metric in METRICS:
            metrics.add_choice(metric, label=metric)
        inputs.enum(
            "metric",
            metrics.values(),
            default="cosine",
            label="Metric",
            view=metrics,
        )
        _common.delegation(ctx, inputs, view, DELEGATE_THRESHOLD)
        return types.Property(
            inputs, view=types.View(label="Build a similarity index")
        )

    def resolve_delegation(self, ctx):
        return _common.wants_delegation(ctx, DELEGATE_THRESHOLD)

    def execute(self, ctx):
        import dinoprop

        params = ctx.params
        view = ctx.target_view()

        def call(progress):
            return dinoprop.compute_similarity(
                view,
                embeddings=params.get("embeddings")
                or _common.DEFAULT_EMBEDDINGS,
                brain_key=params.get("brain_key") or DEFAULT_BRAIN_KEY,
                index_type=params.get("index_type") or "auto",
                metric=params.get("metric") or "cosine",
                progress=progress,
            )

        return _common.run(ctx, self, "Building the index", call, _common.reload)

    def resolve_output(self, ctx):
        return _common.summary_output(
            "Similarity index built",
            [
                ("brain_key", "Brain key", "str"),
                ("index_type", "Index type", "str"),
                ("index_size", "Vectors indexed", "int"),
                ("dim", "Dimension", "int"),
                ("metric", "Metric", "str"),
                ("seconds", "Seconds", "float"),
            ],
        )
