"""Review in Label Studio: the round trip on a real server, and the errors.

The round trip runs a real Label Studio (``labelstudio_support``): the
review queue of real photos goes out pre-filled, a "human" answers through
Label Studio's REST API exactly as its editor does (a correction, an accept
of the suggestion, a skip, a draft, an empty submission, and one
correction of a sample someone relabeled in FiftyOne meanwhile), and only
the decisions may come back. The error tests need no server.
"""

import glob
import http.server
import threading
import warnings

import pytest
import requests

import browser_support as bs
import labelstudio_support as lss
import test_operators as ops
from conftest import REPO_ROOT, random_embeddings

PHOTOS = REPO_ROOT / "plugin" / "dinoprop" / "demo_data" / "clothing"
CLASSES = ("dress", "hat", "pants", "shoes")
PER_CLASS = 4  # photos per class; the first 2 of each are seeds


def _require_sdk():
    try:
        import label_studio_sdk  # noqa: F401
    except ImportError:
        reason = (
            "label-studio-sdk is not installed: the Label Studio tests did NOT "
            "run (pip install -e '.[labelstudio]')"
        )
        warnings.warn(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def label_studio(session_dir):
    """A real Label Studio server for the session (see labelstudio_support)."""
    _require_sdk()
    python = lss.install()
    server = lss.start(python, session_dir, bs.free_port())
    yield server
    server.stop()


@pytest.fixture
def queued_photos():
    """Real photos, 2 seeds per class, propagated: the queue to review."""
    import fiftyone as fo

    import dinoprop

    dataset = fo.Dataset()
    samples = []
    for label in CLASSES:
        files = sorted(glob.glob(str(PHOTOS / label / "*.jpg")))[:PER_CLASS]
        for i, path in enumerate(files):
            sample = fo.Sample(filepath=path, ground_truth=fo.Classification(label=label))
            if i < 2:
                sample["label"] = fo.Classification(label=label)
            samples.append(sample)
    dataset.add_samples(samples)
    random_embeddings(dataset)
    dinoprop.propagate_labels(dataset, "label", progress=False)
    yield dataset
    dataset.delete()


class Human:
    """Answers Label Studio tasks through its REST API, as the editor does."""

    def __init__(self, server):
        self.server = server
        self.headers = {"Authorization": "Token " + server.api_key}

    def _post(self, path, body):
        response = requests.post(self.server.url + path, json=body, headers=self.headers, timeout=30)
        assert response.ok, response.text

    def _choice(self, task, label):
        prediction = task["predictions"][0]["result"][0]
        return [dict(prediction, value={"choices": [label]}, id="human" + str(task["id"]))]

    def submit(self, task, label):
        self._post("/api/tasks/%d/annotations/" % task["id"], {"result": self._choice(task, label)})

    def accept(self, task):
        prediction = task["predictions"][0]
        self._post(
            "/api/tasks/%d/annotations/" % task["id"],
            {"result": prediction["result"], "parent_prediction": prediction["id"]},
        )

    def skip(self, task):  # the editor sends what the task showed: the suggestion
        result = task["predictions"][0]["result"]
        self._post(
            "/api/tasks/%d/annotations/" % task["id"], {"result": result, "was_cancelled": True}
        )

    def submit_empty(self, task):
        self._post("/api/tasks/%d/annotations/" % task["id"], {"result": []})

    def draft(self, task, label):
        self._post("/api/tasks/%d/drafts" % task["id"], {"result": self._choice(task, label)})


def _other(label):
    return next(c for c in CLASSES if c != label)


def test_only_what_humans_submitted_comes_back(label_studio, queued_photos):
    import dinoprop.review as dr
    from dinoprop.core import DinopropError
    from dinoprop.review.labelstudio import LabelStudioClient

    ds = queued_photos
    queue = dr.queue_view(ds, "review", "label")  # shrinks as labels come in
    queued_ids = queue.values("id")
    assert len(queued_ids) >= 7
    seeds_before = {s.id: (s.label.id, s.label.label) for s in ds.exists("label")}
    sent = dr.send_to_annotator(
        queue, "label", url=label_studio.url, api_key=label_studio.api_key
    )
    assert sent.num_sent == sent.num_prefilled == len(queued_ids)
    assert not [f for f in ds.get_field_schema() if f.startswith("dinoprop_annotator")]

    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    results = ds.load_annotation_results(sent.anno_key)
    tasks = {results.uploaded_tasks[t["id"]]: t for t in client.tasks(sent.project_id)}
    suggested = dict(zip(*queue.values(["id", "label_propagated.label"])))
    for sample_id, task in tasks.items():  # every task starts with the suggestion
        assert task["predictions"][0]["result"][0]["value"]["choices"] == [suggested[sample_id]]

    corrected, accepted, skipped, drafted, empty, relabeled, *untouched = queued_ids
    human = Human(label_studio)
    human.submit(tasks[corrected], _other(suggested[corrected]))
    human.accept(tasks[accepted])
    human.skip(tasks[skipped])
    human.draft(tasks[drafted], _other(suggested[drafted]))
    human.submit_empty(tasks[empty])
    human.submit(tasks[relabeled], _other(suggested[relabeled]))
    dr.label_samples(ds.select(relabeled), "label", "hat")  # someone, in FiftyOne

    loaded = dr.load_from_annotator(
        ds, sent.anno_key, url=label_studio.url, api_key=label_studio.api_key, repropagate=True
    )

    summary = loaded.summary()
    assert summary["num_sent"] == len(queued_ids) == len(tasks)
    assert (summary["num_submitted"], summary["num_promoted"]) == (4, 2)
    assert (summary["num_corrected"], summary["num_confirmed"], summary["num_empty"]) == (1, 1, 1)
    assert (summary["num_skipped"], summary["num_drafts"]) == (1, 1)
    assert (summary["num_untouched"], summary["num_changed"]) == (len(untouched), 1)
    assert loaded.empty_ids == [empty]
    labels = {s.id: s.label for s in ds}
    assert labels[corrected].label == _other(suggested[corrected])
    assert dr.sample_triage(ds, corrected, "label")["state"] == "human"
    assert labels[accepted].label == suggested[accepted]
    assert dr.sample_triage(ds, accepted, "label")["state"] == "confirmed"
    assert labels[relabeled].label == "hat"  # the FiftyOne label was kept
    for sample_id in [skipped, drafted, empty] + untouched:
        assert labels[sample_id] is None
    queued = set(ds.match_tags(dr.NEEDS_REVIEW_TAG).values("id"))
    assert queued >= {skipped, drafted, empty, *untouched}
    assert not queued & {corrected, accepted}
    assert summary["num_left_in_queue"] == len(untouched) + 3 == queue.count()
    for sample_id, (label_id, label) in seeds_before.items():
        assert (labels[sample_id].id, labels[sample_id].label) == (label_id, label)
    assert loaded.repropagation["after"]["num_seeds"] == len(seeds_before) + 3
    assert not [f for f in ds.get_field_schema() if f.startswith("dinoprop_annotator")]

    # loading again writes nothing new
    again = dr.load_from_annotator(
        ds, sent.anno_key, url=label_studio.url, api_key=label_studio.api_key
    ).summary()
    assert (again["num_promoted"], again["num_already_promoted"]) == (0, 2)
    assert again["repropagated"] is False

    # FiftyOne's own load would have taken the untouched tasks' predictions
    # (and the skipped and drafted ones') for labels: the trap this avoids
    ds.load_annotations(
        sent.anno_key, dest_field="naive", url=label_studio.url, api_key=label_studio.api_key
    )
    assert ds.select(untouched + [skipped, drafted]).count("naive") == len(untouched) + 2

    with pytest.raises(DinopropError, match="already has an annotation run"):
        dr.send_to_annotator(
            queue, "label", anno_key=sent.anno_key,
            url=label_studio.url, api_key=label_studio.api_key,
        )
    with pytest.raises(DinopropError, match="LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"):
        dr.send_to_annotator(queue, "label", url=label_studio.url, api_key="not-a-token")


def test_the_operators_send_the_queue_and_load_the_decisions(label_studio, queued_photos):
    import dinoprop.review as dr
    from dinoprop.review.labelstudio import LabelStudioClient

    ds = queued_photos
    server = {"url": label_studio.url, "api_key": label_studio.api_key, "label_field": "label"}
    form = ops.resolve_form("send_to_label_studio", ds, server)
    assert ops.blocking_errors(form) == []
    assert form["queue_notice"].view.label == "%d samples in the review queue" % (
        dr.queue_view(ds, "review", "label").count()
    )
    sent = ops.shown_summary(ops.execute("send_to_label_studio", ds, server))
    assert sent["num_sent"] == sent["num_prefilled"] > 0

    results = ds.load_annotation_results(sent["anno_key"])
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    first = client.tasks(results.project_id)[0]
    Human(label_studio).accept(first)
    form = ops.resolve_form("load_reviewed_labels", ds, server)
    assert form["anno_key"].default == sent["anno_key"]
    loaded = ops.shown_summary(
        ops.execute("load_reviewed_labels", ds, dict(server, anno_key=sent["anno_key"]))
    )
    assert (loaded["num_submitted"], loaded["num_promoted"], loaded["num_confirmed"]) == (1, 1, 1)
    assert loaded["num_left_in_queue"] == sent["num_sent"] - 1
    assert loaded["repropagated"] is True
    confirmed = results.uploaded_tasks[first["id"]]
    assert dr.sample_triage(ds, confirmed, "label")["state"] == "confirmed"


# ----------------------------------------------------- errors, no server


class _FakeLabelStudio(http.server.BaseHTTPRequestHandler):
    """Answers ``status`` to every request (set on the server)."""

    def do_GET(self):
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"detail": "Invalid token."}')

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    """A local HTTP server standing in for Label Studio; yields it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    server.status = 401
    server.url = "http://127.0.0.1:%d" % server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def propagated(image_dataset):
    import fiftyone as fo

    truth = image_dataset.values("ground_truth.label")
    image_dataset.set_values(
        "label_propagated", [fo.Classification(label=t, confidence=0.5) for t in truth]
    )
    return image_dataset


def _nothing_left(ds, anno_key=None):
    assert not [f for f in ds.get_field_schema() if f.startswith("dinoprop_annotator")]
    assert ds.list_annotation_runs() == ([] if anno_key is None else [anno_key])


def test_an_unreachable_server_is_named(propagated):
    from dinoprop.core import DinopropError
    from dinoprop.review import send_to_annotator

    url = "http://127.0.0.1:%d" % bs.free_port()
    with pytest.raises(DinopropError, match="not reachable at %s" % url):
        send_to_annotator(propagated, "label", url=url, api_key="x")
    _nothing_left(propagated)


def test_a_refused_token_says_how_to_enable_legacy_tokens(propagated, fake_server):
    from dinoprop.core import DinopropError
    from dinoprop.review import send_to_annotator

    with pytest.raises(DinopropError, match="refused the API key.*LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true"):
        send_to_annotator(propagated, "label", url=fake_server.url, api_key="x")
    _nothing_left(propagated)


def test_a_failed_annotate_leaves_no_run_and_no_scratch_field(propagated, fake_server, monkeypatch):
    import fiftyone.utils.labelstudio as fouls

    from dinoprop.review import annotator_runs, send_to_annotator

    fake_server.status = 200  # dinoprop's check passes; FiftyOne's upload fails
    uploaded = []

    def failing_upload(self, samples, anno_key, launch_editor=False):
        uploaded.append(samples.count(self.config.label_schema and next(iter(self.config.label_schema))))
        raise RuntimeError("upload failed")

    monkeypatch.setattr(fouls.LabelStudioBackend, "upload_annotations", failing_upload)
    with pytest.raises(RuntimeError, match="upload failed"):
        send_to_annotator(propagated, "label", anno_key="review1", url=fake_server.url, api_key="x")
    assert uploaded == [propagated.count()]  # the pre-filled scratch clone
    _nothing_left(propagated)
    assert annotator_runs(propagated) == []


def test_a_run_key_left_by_a_failed_annotate_is_cleaned_up(propagated):
    from dinoprop.core import DinopropError
    from dinoprop.review import send_to_annotator

    dead = "http://127.0.0.1:%d" % bs.free_port()
    with pytest.raises(Exception):  # FiftyOne's own annotate() fails to connect
        propagated.annotate(
            "review1", backend="labelstudio", label_field="label_propagated",
            url=dead, api_key="x",
        )
    assert propagated.list_annotation_runs() == ["review1"]  # left registered
    with pytest.raises(DinopropError, match="not reachable"):
        send_to_annotator(propagated, "label", anno_key="review1", url=dead, api_key="x")
    _nothing_left(propagated)


def test_the_load_form_asks_for_a_sent_run_first(propagated):
    form = ops.resolve_form("load_reviewed_labels", propagated)
    assert ops.blocking_errors(form) == ["Nothing sent yet: run send_to_label_studio first"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "cvat"}, "Unsupported annotation backend"),
        ({"output_field": "missing"}, "does not exist"),
        ({"anno_key": "bad.key"}, "anno_key must be"),
        ({"api_key": None}, "FIFTYONE_LABELSTUDIO_API_KEY"),
    ],
)
def test_bad_arguments_raise_before_anything_is_sent(propagated, kwargs, message):
    from dinoprop.core import DinopropError
    from dinoprop.review import send_to_annotator

    arguments = dict(url="http://127.0.0.1:9", api_key="x")
    arguments.update(kwargs)
    with pytest.raises(DinopropError, match=message):
        send_to_annotator(propagated, "label", **arguments)
    _nothing_left(propagated)


def test_a_missing_label_studio_sdk_says_what_to_install(propagated, monkeypatch):
    import importlib.util

    from dinoprop.core import DinopropError
    from dinoprop.review import load_from_annotator, send_to_annotator

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "label_studio_sdk" else find_spec(name, *a),
    )
    for call in (
        lambda: send_to_annotator(propagated, "label", url="http://127.0.0.1:9", api_key="x"),
        lambda: load_from_annotator(propagated, "run", url="http://127.0.0.1:9", api_key="x"),
    ):
        with pytest.raises(DinopropError, match=r"fiftyone-dinoprop\[labelstudio\]"):
            call()
    _nothing_left(propagated)


def test_samples_without_a_suggestion_cannot_be_prefilled(propagated):
    from dinoprop.core import DinopropError
    from dinoprop.review import send_to_annotator

    propagated.limit(2).set_field("label_propagated", None).save()
    with pytest.raises(DinopropError, match="2 of the 24 samples have no propagated label"):
        send_to_annotator(propagated, "label", url="http://127.0.0.1:9", api_key="x")


def test_loading_an_unknown_run_is_refused(propagated):
    from dinoprop.core import DinopropError
    from dinoprop.review import load_from_annotator

    with pytest.raises(DinopropError, match="no annotation run 'nope'"):
        load_from_annotator(propagated, "nope", url="http://127.0.0.1:9", api_key="x")


def test_task_decisions():
    from dinoprop.review.labelstudio import task_decision

    def annotation(when, result=(), cancelled=False):
        return {"updated_at": when, "result": list(result), "was_cancelled": cancelled}

    choice = [{"type": "choices", "value": {"choices": ["hat"]}}]
    assert task_decision({"annotations": [], "predictions": [{"result": choice}]}) == "untouched"
    assert task_decision({"annotations": [], "drafts": [{"result": choice}]}) == "draft"
    assert task_decision({"annotations": [annotation("1", choice)]}) == "submitted"
    waiting = {"annotations": [annotation("1", choice)], "is_labeled": False}  # overlap 2
    assert task_decision(waiting) == "incomplete"
    assert task_decision({"annotations": [annotation("1")]}) == "empty"
    assert task_decision({"annotations": [annotation("1", cancelled=True)]}) == "skipped"
    newest_skip = [annotation("1", choice), annotation("2", cancelled=True)]
    assert task_decision({"annotations": newest_skip}) == "skipped"
