"""Array-level label propagation: kNN vote, graph diffusion, linear, auto.

Everything here works on numpy arrays and scipy sparse matrices, with no
FiftyOne involved, so it can be tested and benchmarked on its own.
:mod:`dinoprop.propagation` is the FiftyOne glue around it.

Notation: ``N`` nodes (samples or patches), ``C`` classes, ``seed_idx`` the
node indices of the labeled seeds and ``seed_labels`` their class indices in
``[0, C)``. Every method returns an ``N x C`` array of class probabilities.

No ``N x N`` dense matrix is ever formed: graphs are sparse ``N x N`` with
``O(N k)`` entries and every score matrix is ``N x C``.
"""

from dinoprop.propagation_methods.auto import (  # noqa: F401
    AUTO_CANDIDATES,
    CHECKED_PREDICTION_WEIGHT,
    CheckedPredictions,
    Propagation,
    _choose,
    _cv_problem,
    _neighbourhood,
    _out_of_fold,
    _seed_folds,
    can_cross_validate,
    propagate,
    seed_weights,
)
from dinoprop.propagation_methods.calibration import (  # noqa: F401
    TEMPERATURE_RANGE,
    _temperature_nll,
    calibrate,
    effective_count,
    expected_calibration_error,
    fit_temperature,
    laplace_shrink,
    temperature_spread,
    threshold_for_precision,
)
from dinoprop.propagation_methods.features import (  # noqa: F401
    _normalize_rows,
    center_and_normalize,
    one_hot,
    softmax,
)
from dinoprop.propagation_methods.graphs import (  # noqa: F401
    PARALLEL_MIN_NODES,
    Graph,
    ParallelSparse,
    affinity_matrix,
    diffuse,
    nearest_seed_counts,
    normalized_affinity,
)
from dinoprop.propagation_methods.methods import (  # noqa: F401
    GRAPH_LINEAR_C,
    GraphFeatures,
    Problem,
    diffusion_scores,
    graph_features,
    knn_scores,
    linear_logits,
    smooth_scores,
    smoothed_features,
)
from dinoprop.propagation_methods.stopping import (  # noqa: F401
    DEFAULT_TARGET_ACCURACY,
    ERROR_MARGIN_SIGMAS,
    FINISH_MARGIN_SIGMAS,
    StopPlan,
    plan_stop,
    stop_advice,
    stop_plan,
    stopping_forecast,
)

#: The propagation methods, "auto" first.
METHODS = ("auto", "knn", "diffusion", "linear", "graph_linear")
