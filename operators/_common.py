"""What every dinoprop operator shares: form pieces, delegation, progress.

Operators subclass :class:`DinopropOperator`, which builds their config,
form frame, delegation choice and result panel from class attributes; each
operator writes only its form fields (``form``) and its one SDK call
(``call``). ``execute`` runs that call through :func:`run`, which makes the
progress visible in both execution modes:

- immediate: the SDK call runs in a worker thread while the operator (a
  generator) streams ``set_progress`` messages to the App, then the follow-up
  App actions (reload, open a panel, set a view) and the result panel;
- delegated: the SDK's progress callback calls ``ctx.set_progress``, which
  FiftyOne stores on the delegated operation (shown in the App's Runs list),
  and the summary is the operation's result, rendered by ``resolve_output``.
"""

import queue
import threading
import time

import fiftyone.core.fields as fof
import fiftyone.core.labels as fol
import fiftyone.operators as foo
import fiftyone.operators.types as types

#: Name of the form field that chooses delegated execution.
DELEGATE = "delegate"

#: Default embeddings field, as in the SDK.
DEFAULT_EMBEDDINGS = "dinoprop_embedding"

#: Where a run goes (``engine``), as the forms name it.
ENGINES = {"local": "This machine", "ray": "A Ray cluster"}

#: Why a form that needs embeddings cannot be submitted yet.
NO_EMBEDDINGS = "No embeddings yet: run compute_embeddings first"

_DONE = object()
_PROGRESS_INTERVAL = 0.25  # seconds between two progress messages
_DELEGATED_PROGRESS_INTERVAL = 1.0


# ------------------------------------------------------------- the operator


class DinopropOperator(foo.Operator):
    """A dinoprop operator, configured by its class attributes.

    Subclasses set the attributes below, implement :meth:`form` (the form
    fields after the target selector) and :meth:`call` (the one SDK call),
    and may override :meth:`follow_up` (the App actions after an immediate
    run). An operator that does no SDK work (``DELEGATE_THRESHOLD`` None)
    overrides ``resolve_input`` and ``execute`` instead.
    """

    #: The operator's name, label (shown in the operator browser) and
    #: description.
    NAME = None
    LABEL = None
    DESCRIPTION = None

    #: Work on this many samples or more defaults to a delegated run; None
    #: for operators that only run immediately.
    DELEGATE_THRESHOLD = None

    #: Further :class:`fiftyone.operators.OperatorConfig` options.
    CONFIG_OPTIONS = {}

    #: The target selector's action (e.g. ``"Embed"``) and the form's title;
    #: without an action there is no selector and the whole dataset is the
    #: target (a similarity index always covers the dataset).
    TARGET_ACTION = None
    FORM_TITLE = None

    #: The progress label, e.g. ``"Embedding images"``.
    PROGRESS_LABEL = None

    #: The result panel: its title and ``(key, label, kind)`` rows (see
    #: :func:`summary_output`).
    RESULT_TITLE = None
    RESULT_ROWS = ()

    @property
    def config(self):
        # SDK work streams its progress (a generator) or runs in the background
        runs_sdk_work = self.DELEGATE_THRESHOLD is not None
        return foo.OperatorConfig(
            name=self.NAME,
            label=self.LABEL,
            description=self.DESCRIPTION,
            dynamic=True,
            execute_as_generator=runs_sdk_work,
            allow_immediate_execution=True,
            allow_delegated_execution=runs_sdk_work,
            **self.CONFIG_OPTIONS,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = self._target(ctx, inputs)
        if view is not None and view.count() == 0:
            warn(inputs, "target", "The target view has no samples")
        elif self.form(ctx, inputs, view) and not self.always_delegated(ctx.params):
            delegation(ctx, inputs, view, self.DELEGATE_THRESHOLD)
        return types.Property(inputs, view=types.View(label=self.FORM_TITLE))

    def form(self, ctx, inputs, view):
        """Adds the operator's fields to ``inputs`` for the target ``view``.

        Returns:
            whether the form can be submitted (False after a blocking warning)
        """
        raise NotImplementedError

    def always_delegated(self, params):
        """Whether a run with these form ``params`` can only run delegated
        (the form then shows no immediate / delegated choice): runs on a
        Ray cluster (see :func:`engine_choice`) are long, so they do."""
        return params.get("engine") == "ray"

    def resolve_delegation(self, ctx):
        if self.DELEGATE_THRESHOLD is None:
            return None
        if self.always_delegated(ctx.params):
            return True
        if DELEGATE in ctx.params:
            return bool(ctx.params[DELEGATE])
        if ctx.dataset is None:
            return False
        return default_delegation(self._target(ctx), self.DELEGATE_THRESHOLD)

    def _target(self, ctx, inputs=None):
        """The collection the run targets (adding the selector to a form)."""
        if self.TARGET_ACTION is None:
            return ctx.dataset
        if inputs is not None:
            inputs.view_target(ctx, action_description=self.TARGET_ACTION)
        return ctx.target_view()

    def execute(self, ctx):
        view = self._target(ctx)
        params = ctx.params
        return run(
            ctx,
            self,
            self.progress_label(params),
            lambda progress: self.call(view, params, progress),
            self.follow_up,
        )

    def call(self, view, params, progress):
        """Runs the SDK function on ``view`` with the form's ``params``.

        Returns:
            the SDK results (an object with ``summary()``)
        """
        raise NotImplementedError

    def progress_label(self, params):
        """The progress label of a run with these form ``params``."""
        return self.PROGRESS_LABEL

    def follow_up(self, ctx, results):
        """The App actions after an immediate run: reload the dataset."""
        yield ctx.ops.reload_dataset()

    def resolve_output(self, ctx):
        return summary_output(self.RESULT_TITLE, self.RESULT_ROWS)


class Summary:
    """Wraps a summary dict that an SDK call returned (e.g. an undo's), so
    the operator's result panel can show it like any results object."""

    def __init__(self, summary):
        self._summary = summary

    def summary(self):
        return self._summary


# ----------------------------------------------------------------- the form


def label_fields(samples, label_types=(fol.Classification,)):
    """Names of the top-level fields of ``samples`` holding ``label_types``."""
    schema = samples.get_field_schema(embedded_doc_type=label_types)
    return sorted(schema)


def vector_fields(samples):
    """Names of the top-level fields of ``samples`` that can hold vectors."""
    schema = samples.get_field_schema(ftype=(fof.VectorField, fof.ArrayField))
    return sorted(schema)


def brain_keys(samples, run_type):
    """Keys of the brain runs of ``samples`` of a type (e.g. "similarity")."""
    dataset = samples._root_dataset
    return sorted(
        key
        for key in dataset.list_brain_runs()
        if getattr(dataset.get_brain_info(key).config, "type", None)
        == run_type
    )


def field_dropdown(
    ctx,
    inputs,
    name,
    choices,
    label,
    description,
    default=None,
    missing=None,
    required=True,
):
    """Adds a dropdown of field names and returns the chosen one.

    When there is nothing to choose, a warning explaining ``missing`` is shown
    instead and the form cannot be submitted.

    Returns:
        the chosen field name, or None when there is no choice
    """
    if not choices:
        warn(inputs, name, missing or "No suitable field", description)
        return None
    if default not in choices:
        default = choices[0]
    choice_input(
        inputs,
        name,
        choices,
        label,
        description=description,
        default=default,
        required=required,
    )
    value = ctx.params.get(name, default)
    return value if value in choices else default


def embeddings_dropdown(ctx, inputs, view, description):
    """Adds the embeddings field dropdown; None (form blocked) without any."""
    return field_dropdown(
        ctx,
        inputs,
        "embeddings",
        vector_fields(view),
        "Embeddings field",
        description,
        default=DEFAULT_EMBEDDINGS,
        missing=NO_EMBEDDINGS,
        required=False,
    )


def choice_input(inputs, name, choices, label, view=None, **kwargs):
    """Adds an enum input: a dropdown (or another ``view``) of ``choices``.

    Args:
        inputs: the form's :class:`fiftyone.operators.types.Object`
        name: the parameter name
        choices: the values (shown as they are), or a dict of
            ``{value: label}``
        label: the input's label
        view (None): a :class:`fiftyone.operators.types.Choices` view such
            as ``types.RadioGroup()``; a dropdown by default
        **kwargs: further options of ``inputs.enum`` (``default``,
            ``description``, ``required``...)
    """
    if not isinstance(choices, dict):
        choices = {choice: choice for choice in choices}
    if view is None:
        view = types.DropdownView()
    for value, text in choices.items():
        view.add_choice(value, label=text)
    return inputs.enum(name, view.values(), label=label, view=view, **kwargs)


def warn(inputs, name, label, description=None):
    """Shows a warning that blocks the form with ``label`` as the reason."""
    prop = inputs.view(
        name + "_warning",
        types.Warning(label=label, description=description),
    )
    prop.invalid = True
    prop.error_message = label


def notice(inputs, name, label):
    """Shows an informative (non-blocking) notice."""
    inputs.view(name + "_notice", types.Notice(label=label))


def ray_installed():
    """Whether Ray (the ``scale`` extra) can be imported here."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def engine_choice(ctx, inputs, description):
    """Adds the "Run on" choice (this machine or a Ray cluster) when Ray is
    installed.

    Args:
        ctx: the operator's execution context
        inputs: the form's :class:`fiftyone.operators.types.Object`
        description: what a Ray cluster does for this operator

    Returns:
        whether the form's ``engine`` is ``"ray"``
    """
    if not ray_installed():
        return False
    choice_input(
        inputs,
        "engine",
        ENGINES,
        "Run on",
        default="local",
        view=types.RadioGroup(),
        description=description,
    )
    return ctx.params.get("engine") == "ray"


def ray_cluster_inputs(inputs, workers_label, workers_description):
    """Adds the Ray cluster's address and the number of Ray workers.

    Args:
        inputs: the form's :class:`fiftyone.operators.types.Object`
        workers_label: what the workers are, e.g. "Embedding workers"
        workers_description: what one worker holds, and the default count
    """
    inputs.str(
        "ray_address",
        label="Ray cluster address",
        description="e.g. head-node:6379 or ray://head-node:10001; empty "
        "uses RAY_ADDRESS, else a cluster started with `ray start` on the "
        "machine running the operation, else a new local one",
    )
    inputs.int(
        "num_workers",
        min=1,
        label=workers_label,
        description=workers_description,
    )


def graph_engine_inputs(ctx, inputs, description):
    """Where a kNN graph is searched: offers a Ray cluster when Ray is
    installed (:func:`engine_choice`), and its fields when chosen.

    Args:
        ctx: the operator's execution context
        inputs: the form's :class:`fiftyone.operators.types.Object`
        description: what a Ray cluster searches for this operator
    """
    if engine_choice(ctx, inputs, description):
        ray_cluster_inputs(
            inputs,
            "Graph search workers",
            "Ray actors, each holding a copy of the search index; empty: one "
            "per node of the cluster",
        )
        ray_notice(inputs)


def ray_notice(inputs):
    """Says that Ray runs are delegated and what processes them."""
    notice(
        inputs,
        "ray",
        "Ray runs are delegated: start `fiftyone delegated launch` on a "
        "machine that reaches the cluster, and follow the run in the Runs list",
    )


def ray_options(params):
    """The SDK's ``engine``, ``ray_address`` and ``num_workers`` from the
    form's ``params``: empty unless the form chose a Ray cluster."""
    if params.get("engine") != "ray":
        return {}
    return {
        "engine": "ray",
        "ray_address": params.get("ray_address") or None,
        "num_workers": params.get("num_workers") or None,
    }


def delegation(ctx, inputs, samples, threshold):
    """Adds the immediate / delegated choice to the form.

    Work on at least ``threshold`` samples defaults to delegated execution.
    """
    default = default_delegation(samples, threshold)
    inputs.bool(
        DELEGATE,
        default=default,
        label="Run in the background (delegated)",
        description=(
            "Delegated runs are queued for a FiftyOne delegated operation "
            "service (`fiftyone delegated launch`) and show their progress "
            "in the Runs list; immediate runs show progress here. Defaults "
            "to delegated for %d samples or more" % threshold
        ),
        view=types.CheckboxView(),
    )
    if ctx.params.get(DELEGATE, default):
        notice(
            inputs,
            DELEGATE,
            "This run will be queued: start `fiftyone delegated launch` to "
            "process it, and follow it in the Runs list",
        )


def default_delegation(samples, threshold):
    """Whether work on ``samples`` defaults to delegated execution."""
    return samples is not None and samples.count() >= threshold


def summary_output(title, rows):
    """The result panel: one read-only line per ``(key, label, kind)``.

    ``kind`` is ``"int"``, ``"float"`` or ``"str"``.
    """
    outputs = types.Object()
    for key, label, kind in rows:
        getattr(outputs, kind)(key, label=label)
    return types.Property(outputs, view=types.View(label=title))


def brain_key_input(ctx, inputs, view, default, run_type):
    """Adds the brain key input, suggesting the existing runs of that type.

    Warns when the chosen key would replace a run.
    """
    from dinoprop.core import DinopropError, check_brain_key

    key = ctx.params.get("brain_key") or default
    error, replacing = None, False
    try:
        replacing = check_brain_key(view, key, run_type)
    except DinopropError as e:
        error = str(e)
    existing = brain_keys(view, run_type)
    choices = types.AutocompleteView()
    for name in existing:
        choices.add_choice(name, label=name)
    inputs.str(
        "brain_key",
        default=default,
        label="Brain key",
        description="The name of this run (existing %s runs are listed)"
        % run_type,
        view=choices,
        invalid=error is not None,
        error_message=error or "",
    )
    if replacing:
        notice(inputs, "brain_key", "The existing run '%s' will be replaced" % key)
    return key


# ---------------------------------------------------------------- execution


def run(ctx, operator, label, call, follow_up=None):
    """Runs one SDK call with visible progress; see the module docstring.

    Args:
        ctx: the execution context
        operator: the operator (its ``resolve_output`` renders the summary)
        label: the progress label, e.g. ``"Embedding images"``
        call: a function ``call(progress)`` that runs the SDK function with
            ``progress=progress`` and returns an object with ``summary()``
        follow_up (None): an optional function ``follow_up(ctx, results)``
            returning the App actions (``ctx.ops.*`` messages) to send after
            an immediate run

    Returns:
        the summary dict (delegated), or a generator of App messages
        (immediate)
    """
    if ctx.delegated:
        last_sent = [0.0]

        def progress(pb):
            # each update is a database write: at most one per interval
            now = time.monotonic()
            if now - last_sent[0] >= _DELEGATED_PROGRESS_INTERVAL:
                last_sent[0] = now
                ctx.set_progress(progress=_fraction(pb), label=label)

        summary = call(progress).summary()
        ctx.set_progress(progress=1.0, label=label)
        return summary
    return _stream(ctx, operator, label, call, follow_up)


def _stream(ctx, operator, label, call, follow_up):
    updates = queue.Queue()
    outcome = {}

    def work():
        try:
            outcome["results"] = call(lambda pb: updates.put(_fraction(pb)))
        except BaseException as error:  # re-raised in the operator below
            outcome["error"] = error
        finally:
            updates.put(_DONE)

    worker = threading.Thread(target=work, name="dinoprop-operator")
    worker.start()
    yield ctx.ops.set_progress(label=label, progress=0.0)
    last_sent = time.monotonic()
    while True:
        item = updates.get()
        if item is _DONE:
            break
        now = time.monotonic()
        if now - last_sent >= _PROGRESS_INTERVAL and item is not None:
            last_sent = now
            yield ctx.ops.set_progress(label=label, progress=item)
    worker.join()

    if "error" in outcome:
        yield ctx.ops.notify(str(outcome["error"]), variant="error")
        raise outcome["error"]

    results = outcome["results"]
    if follow_up is not None:
        yield from follow_up(ctx, results)
    yield ctx.ops.show_output(
        operator.resolve_output(ctx).to_json(), _rounded(results.summary())
    )


def _rounded(summary):
    """The summary with floats rounded for display."""
    return {
        key: round(value, 4) if isinstance(value, float) else value
        for key, value in summary.items()
    }


def _fraction(pb):
    try:
        value = pb.progress
    except Exception:  # a bar without a known total has no fraction
        return None
    return None if value is None else float(value)
