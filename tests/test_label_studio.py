"""Label Studio push/pull: the task scores, the labelling config, the side table of task ids on
SQLite and PostgreSQL, and the whole loop against a real Label Studio server."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import label_studio_server
import numpy as np
import pytest

from oodmon.cli import main
from oodmon.label_queue import LabelQueue, QueueItem
from oodmon.label_queue.export import label_studio_task, labelling_config, task_confidence
from oodmon.label_queue.label_studio import (
    TASKS_TABLE,
    LabelStudioClient,
    LabelStudioError,
    _ensure_table,
    _record,
    pull,
    push,
    task_ids,
)

CLASSES = [f"digit-{k}" for k in range(10)]


def item(p: float, d: float, **kw) -> QueueItem:
    return QueueItem.create(model="m", version="1", p_value=p, distance=d, **kw)


# --------------------------------------------------------------------------- scores and config


def test_confidence_orders_tasks_like_the_queue_lowest_first() -> None:
    """Lowest confidence first == the queue's priority (p-value, then distance)."""
    rng = np.random.default_rng(0)
    n_cal = 999
    p = (1 + rng.integers(0, 40, size=300)) / (n_cal + 1)  # conformal grid, many ties
    p[:60] = 1 / (n_cal + 1)  # the smallest reachable p-value, tied
    d = rng.exponential(0.5, size=300)
    d[:5] = np.inf  # unknown distances: least OOD among equal p-values
    items = [
        item(float(a), float(b), id=f"i{k}") for k, (a, b) in enumerate(zip(p, d, strict=True))
    ]
    by_queue = sorted(items, key=lambda x: (x.p_value, x.distance))
    by_confidence = sorted(items, key=task_confidence)
    assert [x.id for x in by_confidence] == [x.id for x in by_queue]
    assert all(0.0 < task_confidence(x) <= 1.0 for x in items)
    task = label_studio_task(items[0])
    assert task["predictions"][0]["score"] == task_confidence(items[0])
    assert task["data"]["p_value"] == items[0].p_value  # the evidence stays in data


def test_labelling_config_is_xml_with_every_class() -> None:
    xml = labelling_config(["cat", 'say "hi" & <go>'], from_name="label", to_name="image")
    root = ET.fromstring(xml)
    assert root.tag == "View"
    image = root.find("Image")
    assert image is not None and image.get("name") == "image" and image.get("value") == "$image"
    choices = root.find("Choices")
    assert choices is not None and choices.get("toName") == "image"
    assert [c.get("value") for c in choices.findall("Choice")] == ["cat", 'say "hi" & <go>']
    for bad in ([], ["a", "a"], ["a", " "]):
        with pytest.raises(ValueError, match="class names"):
            labelling_config(bad)


def test_export_writes_the_config_beside_the_tasks(tmp_path: Path, capsys) -> None:
    url = str(tmp_path / "q.db")
    with LabelQueue(url) as q:
        q.put(np.zeros((4, 4), np.uint8), model="m", version="1", p_value=0.1, distance=0.2)
    tasks, config = tmp_path / "tasks.json", tmp_path / "config.xml"
    names = ",".join(CLASSES)
    code = main(
        [
            "queue",
            "export",
            url,
            "-o",
            str(tasks),
            "--class-names",
            names,
            "--config-out",
            str(config),
        ]
    )
    assert code == 0
    values = [c.get("value") for c in ET.fromstring(config.read_text()).iter("Choice")]
    assert values == CLASSES
    capsys.readouterr()
    code = main(["queue", "export", url, "-o", str(tasks), "--config-out", str(config)])
    assert code != 0 and "--class-names" in capsys.readouterr().err


def test_client_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient("http://localhost:8080", "")
    with pytest.raises(ValueError, match=r"http\(s\)"):
        LabelStudioClient("localhost:8080", "key")
    assert LabelStudioClient("http://u:pw@h:1/ls/", "k").url == "http://h:1/ls"


def test_unreachable_server_is_a_clear_error() -> None:
    port = label_studio_server.free_port()  # nothing listens there
    client = LabelStudioClient(f"http://127.0.0.1:{port}", "key", timeout=5)
    with pytest.raises(LabelStudioError, match="Cannot reach Label Studio"):
        client.project(1)


# --------------------------------------------------------------------------- side table


def test_task_ids_live_beside_the_queue_on_both_backends(queue_url: str) -> None:
    with LabelQueue(queue_url) as q:
        a = q.put(np.ones(3), model="m", version="1", p_value=0.01, distance=0.1)
        b = q.put(np.zeros(3), model="m", version="1", p_value=0.02, distance=0.1)
        assert task_ids(q, "http://ls", 1) == {}  # no table yet: nothing pushed
        _ensure_table(q)
        _ensure_table(q)  # idempotent
        _record(q, "http://ls", 1, [(a, 11), (b, 12)], 0.0)
        _record(q, "http://ls", 1, [(a, 99)], 1.0)  # first record wins
        _record(q, "http://other", 1, [(a, 21)], 0.0)
        assert task_ids(q, "http://ls", 1) == {a: 11, b: 12}
        assert task_ids(q, "http://ls", 2) == {}
        assert task_ids(q, "http://other", 1) == {a: 21}
        with q.transaction() as db:
            assert TASKS_TABLE in db.table_names()
    with LabelQueue(queue_url, read_only=True) as q:  # the queue still opens, schema intact
        assert q.stats().queued == 2
        assert task_ids(q, "http://ls", 1) == {a: 11, b: 12}


# --------------------------------------------------------------------------- real Label Studio


@pytest.fixture(scope="module")
def studio() -> Iterator[label_studio_server.LabelStudioServer]:
    for server in label_studio_server.serve():
        # shown with `pytest -s`: how long a fresh Label Studio takes to answer
        print(f"\nLabel Studio {server.url} ready after {server.start_seconds:.1f} s")
        yield server


def digit(k: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    return rng.integers(0, 256, size=(28, 28), dtype=np.uint8)


@pytest.fixture
def queue50(tmp_path: Path) -> str:
    """50 queued digits; p-values on a conformal grid with ties at the most-OOD end."""
    url = str(tmp_path / "queue.db")
    rng = np.random.default_rng(1)
    with LabelQueue(url) as q:
        for k in range(50):
            p = (1 + (0 if k < 8 else int(rng.integers(1, 60)))) / 1000
            q.put(
                digit(k),
                model="mnist",
                version="v1",
                p_value=p,
                distance=float(rng.uniform(0.05, 2.0)),
                predicted=k % 10,
                calibration="c0ffee",
                id=f"item-{k:02d}",
            )
    return url


def new_project(studio: label_studio_server.LabelStudioServer) -> int:
    project = studio.api(
        "POST",
        "/api/projects/",
        {
            "title": f"oodmon {time.time_ns()}",
            "label_config": labelling_config(CLASSES),
        },
    )
    return int(project["id"])


def annotate(studio, task_id: int, label: str) -> None:
    studio.api(
        "POST",
        f"/api/tasks/{task_id}/annotations/",
        {
            "result": [
                {
                    "from_name": "label",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": [label]},
                }
            ],
        },
    )


@pytest.mark.slow
def test_push_pull_round_trip_with_a_real_label_studio(
    studio, queue50: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = new_project(studio)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", studio.personal_token)
    args = ["--label-studio", studio.url, "--project", str(project)]
    capsys.readouterr()

    code = main(
        [
            "queue",
            "push",
            queue50,
            *args,
            "--class-names",
            ",".join(CLASSES),
            "--uncertainty-sampling",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"pushed 50 items to project {project} (0 already there)"
    with LabelQueue(queue50) as q:
        order = [x.id for x in q.items("queued")]
        ids = task_ids(q, studio.url, project)
    assert sorted(ids) == sorted(order) and len(set(ids.values())) == 50

    # uncertainty sampling serves the queue's most-OOD item first
    settings = studio.api("GET", f"/api/projects/{project}/")
    assert settings["sampling"] == "Uncertainty sampling"
    assert settings["model_version"] == "mnist@v1#c0ffee"
    nxt = studio.api("GET", f"/api/projects/{project}/next")
    assert nxt["data"]["oodmon_id"] == order[0]
    listed = studio.api("GET", f"/api/tasks/?project={project}&fields=all&page_size=100")
    scores = [t["predictions"][0]["score"] for t in listed["tasks"]]
    assert len(scores) == 50 and nxt["predictions"][0]["score"] == min(scores)
    assert len(set(scores)) == 50  # tied p-values are told apart by distance

    # annotate 5 through the API, pull them back as done items
    chosen = {
        order[0]: "digit-3",
        order[1]: "digit-7",
        order[10]: "digit-0",
        order[25]: "digit-9",
        order[49]: "digit-1",
    }
    for item_id, label in chosen.items():
        annotate(studio, ids[item_id], label)
    code = main(["queue", "pull", queue50, *args])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert out.strip() == (
        f"labelled 5 items from project {project} (0 unchanged, 0 unknown tasks, 0 conflicts)"
    )
    with LabelQueue(queue50) as q:
        done = {x.id: x for x in q.items("done")}
        assert {k: x.label for k, x in done.items()} == chosen
        assert {x.claimed_by for x in done.values()} == {studio.email}
        assert q.stats().queued == 45
        before = [x.to_json(include_input=False) for x in q.items()]

    # a second push adds nothing; a second pull changes nothing
    code = main(["queue", "push", queue50, *args])
    out, _ = capsys.readouterr()
    assert code == 0 and out.strip() == (
        f"pushed 0 items to project {project} (45 already there)"
    )  # 5 are done
    assert len(studio.api("GET", f"/api/tasks/?project={project}&page_size=100")["tasks"]) == 50
    code = main(["queue", "pull", queue50, *args])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and "labelled 0 items" in out and "5 unchanged" in out
    with LabelQueue(queue50) as q:
        assert [x.to_json(include_input=False) for x in q.items()] == before


@pytest.mark.slow
def test_labelled_in_both_places_keeps_the_latest_and_says_so(
    studio, queue50: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = new_project(studio)
    client = LabelStudioClient(studio.url, studio.personal_token)
    with LabelQueue(queue50) as q:
        push(q, client, project, class_names=CLASSES)
        ids = task_ids(q, studio.url, project)
        # queue first, then Label Studio: Label Studio's label is the later one
        q.done("item-00", "digit-5", worker="alice")
        time.sleep(1.1)
        annotate(studio, ids["item-00"], "digit-6")
        # Label Studio first, then the queue: the queue's label is the later one
        annotate(studio, ids["item-01"], "digit-2")
        time.sleep(1.1)
        q.done("item-01", "digit-8", worker="bob")
        # both agree: no conflict
        q.done("item-02", "digit-4", worker="carol")
        annotate(studio, ids["item-02"], "digit-4")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", studio.personal_token)
    capsys.readouterr()
    code = main(["queue", "pull", queue50, "--label-studio", studio.url, "--project", str(project)])
    out, err = capsys.readouterr()
    assert code == 0
    lines = {line.split()[2]: line for line in err.strip().splitlines()}
    assert sorted(lines) == ["item-00", "item-01"]
    assert all(line.startswith("conflict: item ") for line in lines.values())
    assert "'digit-5' in the queue" in lines["item-00"] and "(label-studio)" in lines["item-00"]
    assert "'digit-2' in Label Studio" in lines["item-01"] and "(queue)" in lines["item-01"]
    assert "2 conflicts" in out and "labelled 1 items" in out
    with LabelQueue(queue50) as q:
        assert q.get("item-00").label == "digit-6"
        assert q.get("item-00").claimed_by == studio.email
        assert q.get("item-01").label == "digit-8"
        assert q.get("item-01").claimed_by == "bob"
        assert q.get("item-02").label == "digit-4"
    # reported once: the same annotations pulled again are no news
    code = main(["queue", "pull", queue50, "--label-studio", studio.url, "--project", str(project)])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and "0 conflicts" in out and "labelled 0 items" in out


@pytest.mark.slow
def test_auth_prefers_bearer_and_falls_back_to_the_legacy_token(studio) -> None:
    project = new_project(studio)
    pat = LabelStudioClient(studio.url, studio.personal_token)
    assert pat.project(project)["id"] == project and pat.scheme == "Bearer"
    legacy = LabelStudioClient(studio.url, studio.legacy_token)
    assert legacy.project(project)["id"] == project and legacy.scheme == "Token"
    wrong = LabelStudioClient(studio.url, "not-a-token")
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY"):
        wrong.project(project)
    with pytest.raises(LabelStudioError, match="404"):
        pat.project(10**6)


@pytest.mark.slow
def test_push_refuses_large_inline_inputs_and_recovers_lost_records(studio, tmp_path) -> None:
    project = new_project(studio)
    client = LabelStudioClient(studio.url, studio.personal_token)
    url = str(tmp_path / "q.db")
    with LabelQueue(url) as q:
        q.put(digit(0), model="m", version="1", p_value=0.01, distance=0.1, id="small")
        q.put(
            reference="https://example.org/big.png",
            model="m",
            version="1",
            p_value=0.02,
            distance=0.1,
            id="by-ref",
        )
        with pytest.raises(ValueError, match="by reference"):
            push(q, client, project, max_inline_bytes=100)
        assert task_ids(q, studio.url, project) == {}  # nothing sent, nothing recorded
        first = push(q, client, project)
        assert first.pushed == 2
        # the local record is lost (a crash between import and record): no duplicate tasks
        with q.transaction(write=True) as db:
            db.execute(f"DELETE FROM {TASKS_TABLE}")
        again = push(q, client, project)
        assert (again.pushed, again.recovered, again.already) == (0, 2, 2)
        assert task_ids(q, studio.url, project) == first.task_ids
        # pull finds an annotated task by its oodmon_id too, and records it
        with q.transaction(write=True) as db:
            db.execute(f"DELETE FROM {TASKS_TABLE}")
        annotate(studio, first.task_ids["small"], "digit-2")
        pulled = pull(q, client, project)
        assert (pulled.labelled, pulled.unknown) == (1, 0) and q.get("small").label == "digit-2"
        assert task_ids(q, studio.url, project) == {"small": first.task_ids["small"]}
    tasks = studio.api("GET", f"/api/tasks/?project={project}&fields=all")["tasks"]
    by_item = {t["data"]["oodmon_id"]: t for t in tasks}
    assert by_item["by-ref"]["data"]["image"] == "https://example.org/big.png"
    assert by_item["small"]["data"]["image"].startswith("data:image/png;base64,")


def test_bad_project_id_fails_before_writing(tmp_path: Path) -> None:
    url = str(tmp_path / "q.db")
    with LabelQueue(url) as q:
        with pytest.raises(ValueError, match="project"):
            push(q, LabelStudioClient("http://127.0.0.1:9", "k"), 0)
        with pytest.raises(ValueError, match="project"):
            pull(q, LabelStudioClient("http://127.0.0.1:9", "k"), True)  # type: ignore[arg-type]
