"""Operator ``compute_similarity``: a faiss similarity index of embeddings."""

from . import _common

DEFAULT_BRAIN_KEY = "dinoprop_similarity"


class ComputeSimilarity(_common.DinopropOperator):
    """Builds a similarity index (``dinoprop.compute_similarity``)."""

    NAME = "compute_similarity"
    LABEL = "dinoprop: build similarity index"
    DESCRIPTION = "faiss nearest-neighbour index for sort by similarity"
    #: Indexing 100k+ vectors defaults to a delegated run.
    DELEGATE_THRESHOLD = 100_000
    TARGET_ACTION = None  # an index covers the dataset; queries take any view
    FORM_TITLE = "Build a similarity index"
    PROGRESS_LABEL = "Building the index"
    RESULT_TITLE = "Similarity index built"
    RESULT_ROWS = [
        ("brain_key", "Brain key", "str"),
        ("index_type", "Index type", "str"),
        ("index_size", "Vectors indexed", "int"),
        ("dim", "Dimension", "int"),
        ("metric", "Metric", "str"),
        ("seconds", "Seconds", "float"),
    ]

    def form(self, ctx, inputs, view):
        # dinoprop.similarity imports FiftyOne Brain: only once a form opens
        from dinoprop.similarity import INDEX_TYPES, METRICS

        _common.notice(
            inputs, "scope",
            "The index covers every embedded sample of the dataset; any view "
            "can then be sorted by similarity with it",
        )
        embeddings = _common.embeddings_dropdown(
            ctx, inputs, view, "The vectors to index"
        )
        if embeddings is None:
            return False
        _common.brain_key_input(
            ctx, inputs, view, DEFAULT_BRAIN_KEY, "similarity"
        )
        _common.choice_input(
            inputs,
            "index_type",
            INDEX_TYPES,
            "Index type",
            default="auto",
            description="auto picks exact search for small datasets and an "
            "approximate index for large ones",
        )
        _common.choice_input(
            inputs, "metric", METRICS, "Metric", default="cosine"
        )
        _common.graph_engine_inputs(
            ctx,
            inputs,
            "A Ray cluster searches the index's similarity graph (which label "
            "propagation and the embeddings map reuse) on all its machines "
            "once the index is built here; only approximate (IVF) indexes "
            "are searched there",
        )
        return True

    def call(self, view, params, progress):
        import dinoprop

        return dinoprop.compute_similarity(
            view,
            embeddings=params.get("embeddings") or _common.DEFAULT_EMBEDDINGS,
            brain_key=params.get("brain_key") or DEFAULT_BRAIN_KEY,
            index_type=params.get("index_type") or "auto",
            metric=params.get("metric") or "cosine",
            progress=progress,
            **_common.ray_options(params),
        )
