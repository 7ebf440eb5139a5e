"""Review in Label Studio: send the review queue, bring back what humans decided.

:func:`send_to_annotator` sends samples (typically the review queue) to a
Label Studio project through FiftyOne's own ``annotate()``, each task
pre-filled with the sample's propagated label (FiftyOne uploads an existing
field's labels as predictions, so a scratch clone of the propagated field
is what is sent). :func:`load_from_annotator` brings the decisions back.

FiftyOne's ``load_annotations`` alone would be wrong here: for every task
without a human annotation it loads the task's **prediction**, so untouched,
skipped and draft tasks would come back looking like human labels. Loading
therefore goes into a scratch field, Label Studio's REST API says which
tasks hold a real human decision (the newest annotation of the task,
submitted, not cancelled, not a draft), and only those are written to the
seed field, as human labels, or as confirmed labels when the annotator
submitted the suggestion unchanged (see :mod:`dinoprop.label_states`). They
leave the review queue; every other sample stays exactly as it was. An
empty submission (the annotator removed the suggestion and chose nothing)
is reported, never applied as a deletion.

What was sent (the seed label each sample held, the class suggested) is
kept in the dataset's execution store ``dinoprop_annotator`` under the
annotation key; a sample whose seed label changed in FiftyOne since it was
sent is left alone and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Optional

from dinoprop.core import DinopropError, dataset_store, validate_samples

logger = logging.getLogger(__name__)

#: The annotation backends :func:`send_to_annotator` supports.
BACKENDS = ("labelstudio",)

#: The execution store recording what each annotation run sent.
ANNOTATOR_STORE = "dinoprop_annotator"

#: Prefix of the scratch fields (``<prefix><anno_key>_sent`` / ``_loaded``).
SCRATCH_PREFIX = "dinoprop_annotator_"

#: What Label Studio holds for a task (see :func:`task_decision`).
SUBMITTED, EMPTY, INCOMPLETE, SKIPPED, DRAFT, UNTOUCHED = DECISIONS = (
    "submitted", "empty", "incomplete", "skipped", "draft", "untouched"
)

LEGACY_TOKEN_HELP = (
    "FiftyOne's Label Studio backend authenticates with a legacy API token "
    "(Account & Settings > Legacy Token). Label Studio 1.17+ disables legacy "
    "tokens unless the organisation was created with "
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true (set it when the server "
    "creates its database); a personal access token does not work here"
)

#: Where a local Label Studio listens by default.
DEFAULT_URL = "http://localhost:8080"

_FIFTYONE_PLACEHOLDER_URL = "https://labelstud.io"  # FiftyOne's default "url"
_TIMEOUT = 30  # seconds per REST request
_PAGE_SIZE = 100  # tasks per REST page


class SendResults:
    """What :func:`send_to_annotator` sent.

    Attributes:
        anno_key: the FiftyOne annotation run (pass it to
            :func:`load_from_annotator`)
        label_field: the seed field the decisions will go to
        output_field: the propagated field the suggestions came from
        project_id: the Label Studio project
        project_url: its address
        num_sent: samples sent (one task each)
        num_prefilled: tasks pre-filled with the propagated label
    """

    def __init__(self, anno_key, label_field, output_field, project_id, project_url, num_sent, num_prefilled):
        self.anno_key = anno_key
        self.label_field = label_field
        self.output_field = output_field
        self.project_id = project_id
        self.project_url = project_url
        self.num_sent = num_sent
        self.num_prefilled = num_prefilled

    def summary(self) -> dict:
        """Returns the JSON-serialisable numbers an App result panel shows."""
        return dict(vars(self))

    def __repr__(self) -> str:
        return "SendResults(%s)" % self.summary()


class LoadResults:
    """What :func:`load_from_annotator` brought back.

    Attributes:
        anno_key: the annotation run
        label_field: the seed field written
        num_sent: samples the run sent
        num_submitted: tasks whose newest annotation is a submission
            (including empty ones)
        num_promoted: samples that received the human decision in the seed
            field on this load (``num_corrected`` human labels plus
            ``num_confirmed`` confirmed suggestions)
        num_corrected: submissions of another class than the suggestion
        num_confirmed: submissions of the suggested class
        num_empty: submissions without a class, reported and not applied
        num_incomplete: submissions on tasks that wait for more annotators
            (the project's overlap), not written yet
        num_skipped: tasks the annotator skipped (cancelled)
        num_drafts: tasks with only a draft
        num_untouched: tasks nobody annotated
        num_already_promoted: decisions an earlier load already wrote
        num_changed: decisions not written because the sample's seed label
            changed in FiftyOne since it was sent
        num_left_in_queue: sent samples still in the review queue (after
            the re-propagation, if any)
        empty_ids: the samples of the empty submissions
        repropagation: :func:`dinoprop.review.repropagate`'s dict when the
            labels were re-propagated, else None
    """

    def __init__(self, anno_key, label_field, num_sent, counts, num_left_in_queue, empty_ids, repropagation=None):
        self.anno_key = anno_key
        self.label_field = label_field
        self.num_sent = num_sent
        self.num_submitted = counts[SUBMITTED] + counts[EMPTY]
        self.num_corrected = counts["corrected"]
        self.num_confirmed = counts["confirmed"]
        self.num_promoted = self.num_corrected + self.num_confirmed
        self.num_empty = counts[EMPTY]
        self.num_incomplete = counts[INCOMPLETE]
        self.num_skipped = counts[SKIPPED]
        self.num_drafts = counts[DRAFT]
        self.num_untouched = counts[UNTOUCHED]
        self.num_already_promoted = counts["already"]
        self.num_changed = counts["changed"]
        self.num_left_in_queue = num_left_in_queue
        self.empty_ids = list(empty_ids)
        self.repropagation = repropagation

    def summary(self) -> dict:
        """Returns the JSON-serialisable numbers an App result panel shows."""
        summary = {k: v for k, v in vars(self).items() if k not in ("empty_ids", "repropagation")}
        summary["repropagated"] = self.repropagation is not None
        return summary

    def __repr__(self) -> str:
        return "LoadResults(%s)" % self.summary()


def send_to_annotator(
    samples: Any,
    label_field: str,
    output_field: Optional[str] = None,
    anno_key: Optional[str] = None,
    prefill: bool = True,
    backend: str = "labelstudio",
    url: Optional[str] = None,
    api_key: Optional[str] = None,
    **backend_kwargs: Any,
) -> SendResults:
    """Sends samples to Label Studio for a human decision, suggestion pre-filled.

    Args:
        samples: the samples to review, e.g.
            :func:`dinoprop.review.queue_view(dataset, "review", label_field)
            <dinoprop.review.queue_view>`
        label_field: the seed field the decisions will be written to
        output_field: the propagated field holding the suggestions; defaults
            to ``"<label_field>_propagated"``
        anno_key: the FiftyOne annotation run key; defaults to
            ``"dinoprop_<UTC time>"``
        prefill: whether each task starts with the propagated label as a
            prediction the annotator can accept or change
        backend: the annotation backend; only ``"labelstudio"``
        url: the Label Studio server; defaults to :func:`default_url`
        api_key: a legacy API token; defaults to FiftyOne's annotation config
            (``FIFTYONE_LABELSTUDIO_API_KEY``)
        **backend_kwargs: further arguments of FiftyOne's ``annotate()``,
            e.g. ``project_name``

    Returns:
        a :class:`SendResults`

    Raises:
        DinopropError: for an empty view, another backend, a missing or
            wrong field, a run key that exists, samples without a
            propagated label to pre-fill, an unreachable server or a
            refused token; nothing stays registered then
    """
    import fiftyone.core.labels as fol

    from dinoprop.core import require_label_field
    from dinoprop.label_schema import known_classes
    from dinoprop.review.triage import label_version

    validate_samples(samples)
    _check_backend(backend)
    dataset = samples._root_dataset
    output_field = output_field or label_field + "_propagated"
    require_label_field(samples, output_field, (fol.Classification,))
    has_seeds = samples.get_field(label_field) is not None
    if has_seeds:
        require_label_field(samples, label_field, (fol.Classification,))
    anno_key = anno_key or datetime.now(timezone.utc).strftime("dinoprop_%Y%m%d_%H%M%S")
    _free_run_key(dataset, anno_key)
    columns = samples.values(["id", output_field + ".label"] + [label_field] * has_seeds)
    ids, suggested = columns[:2]
    seeds = columns[2] if has_seeds else [None] * len(ids)
    missing = sum(s is None for s in suggested)
    if prefill and missing:
        raise DinopropError(
            "%d of the %d samples have no propagated label in '%s' to pre-fill; "
            "run propagate_labels first, or send them with prefill=False"
            % (missing, len(ids), output_field)
        )
    url, api_key = _credentials(url, api_key)
    client = LabelStudioClient(url, api_key)
    client.check()
    scratch = SCRATCH_PREFIX + anno_key + "_sent"
    if prefill:
        samples.clone_sample_field(output_field, scratch)
    classes = known_classes(dataset, label_field)
    classes += sorted({s for s in suggested if s is not None} - set(classes))
    try:
        results = samples.annotate(
            anno_key,
            backend=backend,
            label_field=scratch,
            label_type="classification",
            classes=classes,
            attributes=False,
            url=url,
            api_key=api_key,
            **backend_kwargs,
        )
    except Exception as error:
        if dataset.has_annotation_run(anno_key):
            dataset.delete_annotation_run(anno_key)  # annotate() leaves it
        raise client.explain(error) from error
    finally:
        if dataset.has_sample_field(scratch):
            dataset.delete_sample_field(scratch)
    dataset_store(dataset, ANNOTATOR_STORE).set(
        anno_key,
        {
            "label_field": label_field,
            "output_field": output_field,
            "sent": {
                sid: [label_version(seed), suggestion if prefill else None]
                for sid, seed, suggestion in zip(ids, seeds, suggested)
            },
            "promoted": [],
        },
    )
    return SendResults(
        anno_key,
        label_field,
        output_field,
        results.project_id,
        "%s/projects/%s" % (url.rstrip("/"), results.project_id),
        len(ids),
        len(ids) if prefill else 0,
    )


def load_from_annotator(
    samples: Any,
    anno_key: str,
    url: Optional[str] = None,
    api_key: Optional[str] = None,
    repropagate: bool = False,
) -> LoadResults:
    """Writes the decisions humans submitted in Label Studio to the seed field.

    Only tasks whose newest annotation is a submitted, non-cancelled one
    with a class are written: as a confirmed label when the class is the
    one suggested, else as a human label (one undoable labeling batch per
    class, see :func:`dinoprop.review.undo_labeling`). Those samples leave
    the review queue; every other sample, and every seed, stays as it was.
    Loading again later brings the decisions made since.

    Args:
        samples: the dataset (or a view of it) the run was sent from
        anno_key: :attr:`SendResults.anno_key`
        url: the Label Studio server; defaults to :func:`default_url`
        api_key: a legacy API token; defaults to FiftyOne's annotation config
        repropagate: re-run the newest propagation of the seed field when
            any decision was written

    Returns:
        a :class:`LoadResults`

    Raises:
        DinopropError: for an unknown run, an unreachable server or a
            refused token; nothing is written then
    """
    from dinoprop.propagation import NEEDS_REVIEW_TAG
    from dinoprop.review.loop import repropagate as rerun
    from dinoprop.review.queue import queue_view
    from dinoprop.review.triage import label_samples, label_version

    _check_backend(BACKENDS[0])
    dataset = samples._root_dataset
    store = dataset_store(dataset, ANNOTATOR_STORE)
    record = store.get(anno_key)
    if record is None or not dataset.has_annotation_run(anno_key):
        raise DinopropError(
            "Dataset '%s' has no annotation run '%s' sent by send_to_annotator"
            % (dataset.name, anno_key)
        )
    url, api_key = _credentials(url, api_key)
    client = LabelStudioClient(url, api_key)
    client.check()
    results = dataset.load_annotation_results(anno_key, url=url, api_key=api_key)
    decisions = {
        results.uploaded_tasks[task["id"]]: task_decision(task)
        for task in client.tasks(results.project_id)
        if task["id"] in results.uploaded_tasks
    }
    loaded_field = SCRATCH_PREFIX + anno_key + "_loaded"
    try:
        dataset.load_annotations(
            anno_key, dest_field=loaded_field, unexpected="ignore", url=url, api_key=api_key
        )
        loaded = dict(zip(*dataset.exists(loaded_field).values(["id", loaded_field + ".label"])))
    except Exception as error:
        raise client.explain(error) from error
    finally:
        if dataset.has_sample_field(loaded_field):
            dataset.delete_sample_field(loaded_field)

    label_field, sent = record["label_field"], record["sent"]
    promoted = set(record["promoted"])
    current = _seed_versions(dataset, label_field, list(sent))
    counts = Counter(dict.fromkeys(DECISIONS, 0))
    groups, empty_ids = {}, []
    for sample_id, (version, suggestion) in sent.items():
        decision = decisions.get(sample_id, UNTOUCHED)
        label = loaded.get(sample_id)
        if decision == SUBMITTED and label is None:
            decision = EMPTY  # a submission without a class of this task
        counts[decision] += 1
        if decision == EMPTY:
            empty_ids.append(sample_id)
        if decision != SUBMITTED:
            continue
        if sample_id in promoted:
            counts["already"] += 1
        elif current.get(sample_id, label_version(None)) != version:
            counts["changed"] += 1
        else:
            groups.setdefault((label, label == suggestion), []).append(sample_id)
    written = []
    for (label, confirmed), group in sorted(groups.items()):
        batch = label_samples(
            dataset.select(group), label_field, label, confirmed=confirmed,
            output_field=record["output_field"],
        )
        counts["confirmed" if confirmed else "corrected"] += len(batch.sample_ids)
        counts["changed"] += len(batch.conflicts)
        written += batch.sample_ids
    if written:
        dataset.select(written).untag_samples(NEEDS_REVIEW_TAG)
        store.set(anno_key, dict(record, promoted=sorted(promoted | set(written))))
    if empty_ids:
        logger.warning(
            "%d tasks were submitted without a class; their samples were left "
            "as they are: %s", len(empty_ids), ", ".join(empty_ids[:10])
        )
    repropagation = rerun(dataset, label_field) if repropagate and written else None
    in_queue = len(set(sent) & set(queue_view(dataset, "review", label_field).values("id")))
    return LoadResults(
        anno_key, label_field, len(sent), counts, in_queue, empty_ids, repropagation
    )


def annotator_runs(samples: Any) -> list:
    """The annotation keys :func:`send_to_annotator` recorded, newest first.

    Args:
        samples: a FiftyOne dataset or view (its dataset is used)
    """
    dataset = samples._root_dataset
    store = dataset_store(dataset, ANNOTATOR_STORE)
    keys = [k for k in store.list_keys() if dataset.has_annotation_run(k)]
    return sorted(keys, key=lambda k: dataset.get_annotation_info(k).timestamp, reverse=True)


def task_decision(task: dict) -> str:
    """What a human decided on one Label Studio task (its REST JSON).

    The newest annotation of the task counts (the one FiftyOne loads):

    - :data:`SUBMITTED`: submitted with a result;
    - :data:`EMPTY`: submitted with an empty result;
    - :data:`INCOMPLETE`: submitted, but the task is not labeled yet (the
      project's overlap asks for more annotators; FiftyOne would load the
      prediction);
    - :data:`SKIPPED`: cancelled (the annotator pressed Skip);
    - :data:`DRAFT`: no annotation, only a draft;
    - :data:`UNTOUCHED`: nothing (a prediction is not a decision).

    Args:
        task: a task as ``GET /api/tasks?fields=all`` returns it

    Returns:
        one of :data:`DECISIONS`
    """
    annotations = task.get("annotations") or []
    if not annotations:
        return DRAFT if task.get("drafts") else UNTOUCHED
    newest = max(annotations, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
    if newest.get("was_cancelled"):
        return SKIPPED
    if not newest.get("result"):
        return EMPTY
    return SUBMITTED if task.get("is_labeled", True) else INCOMPLETE


class LabelStudioClient:
    """The few Label Studio REST calls dinoprop makes, with clear errors.

    Args:
        url: the server, e.g. ``http://localhost:8080``
        api_key: a legacy API token
    """

    def __init__(self, url: str, api_key: str):
        self.url = url.rstrip("/")
        self.api_key = api_key

    def get(self, path: str, **params: Any) -> Any:
        """``GET`` a REST path and return its JSON.

        Raises:
            DinopropError: when the server is unreachable, refuses the
                token, or answers with an error
        """
        import requests

        try:
            response = requests.get(
                self.url + path,
                params=params,
                headers={"Authorization": "Token %s" % self.api_key},
                timeout=_TIMEOUT,
            )
        except requests.RequestException as error:
            raise self.unreachable(error) from error
        if response.status_code == 401:
            raise DinopropError(
                "Label Studio at %s refused the API key (%s). %s"
                % (self.url, _detail(response), LEGACY_TOKEN_HELP)
            )
        if not response.ok:
            raise DinopropError(
                "Label Studio at %s answered %d to GET %s: %s"
                % (self.url, response.status_code, path, _detail(response))
            )
        return response.json()

    def check(self) -> None:
        """Checks that the server answers and accepts the token.

        Raises:
            DinopropError: as :meth:`get`
        """
        self.get("/api/current-user/whoami")

    def tasks(self, project_id: int) -> list:
        """Every task of a project, with its annotations and drafts."""
        tasks, page = [], 1
        while True:
            answer = self.get(
                "/api/tasks", project=project_id, page=page, page_size=_PAGE_SIZE, fields="all"
            )
            batch = answer["tasks"] if isinstance(answer, dict) else answer
            tasks += batch
            if len(batch) < _PAGE_SIZE:
                return tasks
            page += 1

    def unreachable(self, error: Exception) -> DinopropError:
        """The error saying the server cannot be reached."""
        return DinopropError(
            "Label Studio is not reachable at %s (%s). Start it (`label-studio "
            "start --internal-host 127.0.0.1 -p 8080`) or pass the right url"
            % (self.url, error.__class__.__name__)
        )

    def explain(self, error: Exception) -> Exception:
        """A clear error for one FiftyOne's backend raised, else ``error``."""
        import requests

        if isinstance(error, DinopropError):
            return error
        if isinstance(error, requests.ConnectionError):
            return self.unreachable(error)
        response = getattr(error, "response", None)
        if getattr(response, "status_code", None) == 401:
            return DinopropError(
                "Label Studio at %s refused the API key. %s" % (self.url, LEGACY_TOKEN_HELP)
            )
        return error


def _check_backend(backend):
    """Raises unless ``backend`` is supported and its client is installed."""
    import importlib.util

    if backend not in BACKENDS:
        raise DinopropError(
            "Unsupported annotation backend %r; dinoprop can tell human "
            "decisions from pre-filled suggestions only in %s"
            % (backend, ", ".join(BACKENDS))
        )
    if importlib.util.find_spec("label_studio_sdk") is None:
        raise DinopropError(
            "FiftyOne's Label Studio backend needs label-studio-sdk: pip "
            "install 'fiftyone-dinoprop[labelstudio]' (or "
            "'label-studio-sdk>=1.0.20,<2')"
        )


def default_url() -> str:
    """The Label Studio server of FiftyOne's annotation config
    (``FIFTYONE_LABELSTUDIO_URL``), else :data:`DEFAULT_URL`."""
    import fiftyone as fo

    url = fo.annotation_config.backends.get("labelstudio", {}).get("url")
    return DEFAULT_URL if url in (None, "", _FIFTYONE_PLACEHOLDER_URL) else url


def _credentials(url, api_key):
    """The server and token: the arguments, else FiftyOne's annotation config."""
    import fiftyone as fo

    url = url or default_url()
    api_key = api_key or fo.annotation_config.backends.get("labelstudio", {}).get("api_key")
    if not api_key:
        raise DinopropError(
            "Label Studio needs an API key (a legacy token): pass api_key=, or "
            "set FIFTYONE_LABELSTUDIO_API_KEY"
        )
    return url, api_key


def _free_run_key(dataset, anno_key):
    """Makes sure ``anno_key`` names no run, removing one a failed
    ``annotate()`` left registered without results."""
    from dinoprop.core import check_field_name

    check_field_name(anno_key, "anno_key")
    if not dataset.has_annotation_run(anno_key):
        return
    if dataset.load_annotation_results(anno_key) is None:
        logger.warning(
            "Removing annotation run '%s', left registered without results by "
            "a failed annotate()", anno_key
        )
        dataset.delete_annotation_run(anno_key)
        return
    raise DinopropError(
        "Dataset '%s' already has an annotation run '%s': load it with "
        "load_from_annotator, choose another anno_key, or delete it with "
        "dataset.delete_annotation_run(%r)" % (dataset.name, anno_key, anno_key)
    )


def _seed_versions(dataset, label_field, ids):
    """``{sample_id: label_version(seed label)}`` of the samples now."""
    from dinoprop.review.triage import label_version

    if dataset.get_field(label_field) is None:
        return {}
    found, seeds = dataset.select(ids).values(["id", label_field])
    return {sid: label_version(seed) for sid, seed in zip(found, seeds)}


def _detail(response):
    """The server's error message, shortened."""
    try:
        return str(response.json().get("detail") or response.text)[:200]
    except ValueError:
        return response.text[:200]
