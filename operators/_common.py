"""What every dinoprop operator shares: form pieces, delegation, progress.

An operator's ``execute`` reads its form, calls one SDK function through
:func:`run`, and returns the SDK summary. :func:`run` makes the progress
visible in both execution modes:

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
import fiftyone.operators.types as types

#: Name of the form field that chooses delegated execution.
DELEGATE = "delegate"

#: Default embeddings field, as in the SDK.
DEFAULT_EMBEDDINGS = "dinoprop_embedding"

_DONE = object()
_PROGRESS_INTERVAL = 0.25  # seconds between two progress messages
_DELEGATED_PROGRESS_INTERVAL = 1.0


# ----------------------------------------------------------------- the form


def target_view(ctx, inputs, action):
    """Adds the target selector (dataset / current view / selected samples).

    Args:
        ctx: the execution context
        inputs: the form's :class:`fiftyone.operators.types.Object`
        action: what the operator does, e.g. ``"Embed"``

    Returns:
        the collection the user's current choice targets
    """
    inputs.view_target(ctx, action_description=action)
    return ctx.target_view()


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
    dropdown = types.DropdownView()
    for choice in choices:
        dropdown.add_choice(choice, label=choice)
    if default not in choices:
        default = choices[0]
    inputs.enum(
        name,
        dropdown.values(),
        default=default,
        required=required,
        label=label,
        description=description,
        view=dropdown,
    )
    value = ctx.params.get(name, default)
    return value if value in choices else default


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


def wants_delegation(ctx, threshold):
    """The delegation choice of a request (the form's, else the default)."""
    if DELEGATE in ctx.params:
        return bool(ctx.params[DELEGATE])
    if ctx.dataset is None:
        return False
    return default_delegation(ctx.target_view(), threshold)


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
    key = ctx.params.get("brain_key") or default
    error = None
    if not key.replace("_", "").isalnum():
        error = "Use letters, digits and underscores only"
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
    if error is None and key in view._root_dataset.list_brain_runs():
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


def reload(ctx, results):
    """Follow-up of runs that change the dataset: reload it in the App."""
    yield ctx.ops.reload_dataset()


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
