"""Label Studio as the labelling front end of a label queue: push tasks, pull labels back.

``push`` sends queued items to a Label Studio project as tasks with a prediction, most OOD
first, and records each item's task id; ``pull`` brings finished annotations back as ``done``
items with the chosen label and the annotator. Both are idempotent.

* The task ids live in a side table, ``label_studio_tasks``, in the queue's own database
  (SQLite or PostgreSQL, through :meth:`LabelQueue.transaction`), so the queue's schema is
  untouched and a second push adds only new items. Before importing, ``push`` also reads the
  ``oodmon_id`` of the tasks already in the project, so a push that died between Label
  Studio's import and the local record does not import twice.
* The prediction ``score`` is a confidence (low = most OOD; see
  :func:`oodmon.label_queue.export.task_confidence`), so the project's "Uncertainty sampling" serves
  the most-OOD task first. Label Studio only applies it to predictions whose
  ``model_version`` equals the project's: ``configure_sampling=True`` sets both.
* Inputs: image-like arrays go inline as PNG data URIs (a 28 x 28 digit is under 1 kB); an
  item stored by reference sends its reference (a URL Label Studio or its cloud storage can
  serve) instead of the bytes, which is the way for large inputs (Label Studio is slow with
  large inline base64 data). Inline images above ``max_inline_bytes`` are refused with a
  message that says so, rather than sent.
* Auth: ``LABEL_STUDIO_API_KEY`` holds a personal access token, exchanged at
  ``/api/token/refresh/`` for a short-lived access token sent as ``Authorization: Bearer``
  (refreshed once on a 401); when the refresh is refused the key is tried as a legacy token
  (``Authorization: Token``).
* Conflicts: an item labelled in the queue and (differently) in Label Studio keeps the latest
  label; each conflict is reported (``PullResult.conflicts``; the CLI prints one line per
  conflict on stderr, and a count).

Plain HTTP over the standard library (``urllib``): no extra dependency.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from oodmon.errors import OodmonError
from oodmon.label_queue.errors import ItemNotFoundError, LeaseError
from oodmon.label_queue.export import label_studio_task
from oodmon.label_queue.item import QueueItem
from oodmon.label_queue.store import LabelQueue

__all__ = [
    "API_KEY_ENV",
    "TASKS_TABLE",
    "LabelStudioClient",
    "LabelStudioError",
    "PullResult",
    "PushResult",
    "pull",
    "push",
    "task_ids",
]

#: Environment variable that holds the Label Studio API key (personal access token).
API_KEY_ENV = "LABEL_STUDIO_API_KEY"
#: Side table, in the queue's database, mapping items to Label Studio tasks.
TASKS_TABLE = "label_studio_tasks"
#: Label Studio's name for uncertainty sampling (lowest prediction score first).
UNCERTAINTY_SAMPLING = "Uncertainty sampling"


class LabelStudioError(OodmonError, ConnectionError):
    """Label Studio could not be reached, refused the credentials, or answered an error."""


# ---------------------------------------------------------------------- HTTP client


class LabelStudioClient:
    """A minimal Label Studio API client (the endpoints push and pull need).

    Args:
        url: the server, e.g. ``http://localhost:8080``.
        api_key: a personal access token (or a legacy token; see the module docstring).
        timeout: seconds per HTTP request.
    """

    def __init__(self, url: str, api_key: str, *, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"Expected the Label Studio URL as http(s)://host[:port], but got {url!r}."
            )
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError(
                f"Expected a Label Studio API key, but got none: set {API_KEY_ENV} to a personal "
                "access token (Label Studio: Account & Settings > Personal Access Token)."
            )
        self.url = urllib.parse.urlunsplit(
            (parsed.scheme, parsed.netloc.rsplit("@", 1)[-1], parsed.path.rstrip("/"), "", "")
        )
        self.timeout = float(timeout)
        self._key = api_key.strip()
        self._auth: str | None = None
        self.scheme: str | None = None  # "Bearer" or "Token" once authenticated

    def __repr__(self) -> str:
        return f"LabelStudioClient({self.url!r})"

    # ------------------------------------------------------------------ auth

    def _authorize(self) -> str:
        """Exchange the personal access token for an access token, or fall back to legacy."""
        try:
            answer = self._send("POST", "/api/token/refresh/", {"refresh": self._key}, auth=None)
        except _HTTPStatusError as err:
            if err.status not in (400, 401, 403, 404):
                raise LabelStudioError(err.describe()) from None
            self.scheme = "Token"
            return f"Token {self._key}"
        access = answer.get("access") if isinstance(answer, dict) else None
        if not isinstance(access, str):
            raise LabelStudioError(
                f"{self.url}/api/token/refresh/ answered without an access token: {answer!r}."
            )
        self.scheme = "Bearer"
        return f"Bearer {access}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
    ) -> Any:
        """One authenticated API call; returns the decoded JSON (None for an empty body).

        Raises:
            LabelStudioError: unreachable server, refused credentials, or an error status.
        """
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        if self._auth is None:
            self._auth = self._authorize()
        try:
            return self._send(method, path, body, auth=self._auth)
        except _HTTPStatusError as err:
            if err.status != 401:
                raise LabelStudioError(err.describe()) from None
        # an access token lives minutes: refresh once, then give up
        self._auth = self._authorize()
        try:
            return self._send(method, path, body, auth=self._auth)
        except _HTTPStatusError as err:
            hint = (
                f" Check {API_KEY_ENV}: a personal access token, or a legacy token with legacy "
                "tokens enabled for the organization."
                if err.status == 401
                else ""
            )
            raise LabelStudioError(err.describe() + hint) from None

    def _send(self, method: str, path: str, body: Any, auth: str | None) -> Any:
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth is not None:
            req.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode("utf-8", "replace")
            raise _HTTPStatusError(
                method, self.url + path.split("?")[0], err.code, detail
            ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise LabelStudioError(
                f"Cannot reach Label Studio at {self.url} ({reason}); is it running?"
            ) from None
        return json.loads(raw) if raw.strip() else None

    # ------------------------------------------------------------------ endpoints

    def project(self, project: int) -> dict[str, Any]:
        """The project's settings."""
        answer: dict[str, Any] = self.request("GET", f"/api/projects/{int(project)}/")
        return answer

    def update_project(self, project: int, **fields: Any) -> dict[str, Any]:
        """Change the project's settings; returns them as changed."""
        answer: dict[str, Any] = self.request("PATCH", f"/api/projects/{int(project)}/", fields)
        return answer

    def import_tasks(self, project: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Import tasks (with predictions); returns their new task ids, in order."""
        answer = self.request(
            "POST", f"/api/projects/{int(project)}/import", list(tasks), {"return_task_ids": "true"}
        )
        ids = answer.get("task_ids") if isinstance(answer, dict) else None
        if not isinstance(ids, list) or len(ids) != len(tasks):
            raise LabelStudioError(
                f"Label Studio imported {len(tasks)} tasks into project {project} but returned "
                f"{ids!r} as their ids; check the project with `oodmon queue push` again "
                "(it finds imported tasks by their oodmon_id)."
            )
        return [int(i) for i in ids]

    def tasks(self, project: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every task of a project with its annotations, page by page."""
        page = 1
        seen = 0
        while True:
            answer = self.request(
                "GET",
                "/api/tasks/",
                query={
                    "project": int(project),
                    "page": page,
                    "page_size": page_size,
                    "fields": "all",
                },
            )
            batch = answer.get("tasks", []) if isinstance(answer, dict) else answer
            yield from batch
            seen += len(batch)
            total = answer.get("total") if isinstance(answer, dict) else None
            if not batch or len(batch) < page_size or (total is not None and seen >= total):
                return
            page += 1

    def users(self) -> dict[int, str]:
        """User id -> email (or username), to name annotators."""
        answer = self.request("GET", "/api/users/")
        users = answer.get("results", answer) if isinstance(answer, dict) else answer
        return {
            int(u["id"]): str(u.get("email") or u.get("username") or u["id"])
            for u in users or []
            if isinstance(u, dict) and "id" in u
        }


class _HTTPStatusError(Exception):
    def __init__(self, method: str, url: str, status: int, detail: str) -> None:
        super().__init__(status)
        self.method, self.url, self.status, self.detail = method, url, status, detail

    def describe(self) -> str:
        return f"Label Studio answered {self.status} to {self.method} {self.url}: {self.detail}"


# ---------------------------------------------------------------------- side table


def _ensure_table(queue: LabelQueue) -> None:
    with queue.transaction(write=True) as db:
        db.execute(
            f"""CREATE TABLE IF NOT EXISTS {TASKS_TABLE} (
                item_id TEXT NOT NULL,
                server TEXT NOT NULL,
                project BIGINT NOT NULL,
                task_id BIGINT NOT NULL,
                pushed_at {db.float_type} NOT NULL,
                annotation_id BIGINT,
                annotation_updated TEXT,
                PRIMARY KEY (server, project, item_id)
            )"""
        )


def task_ids(queue: LabelQueue, server: str, project: int) -> dict[str, int]:
    """Item id -> Label Studio task id for the items pushed to ``server``'s ``project``."""
    with queue.transaction(write=False) as db:
        if TASKS_TABLE not in db.table_names():
            return {}
        rows = db.query(
            f"SELECT item_id, task_id FROM {TASKS_TABLE} WHERE server = ? AND project = ?",
            (server, int(project)),
        )
    return {str(item): int(task) for item, task in rows}


def _record(
    queue: LabelQueue, server: str, project: int, pairs: Sequence[tuple[str, int]], now: float
) -> None:
    with queue.transaction(write=True) as db:
        db.executemany(
            f"INSERT INTO {TASKS_TABLE} (item_id, server, project, task_id, pushed_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (server, project, item_id) DO NOTHING",
            [(item, server, int(project), int(task), now) for item, task in pairs],
        )


# ---------------------------------------------------------------------- push


@dataclass(frozen=True)
class PushResult:
    """What one push did.

    Attributes:
        pushed: items imported as new tasks now.
        already: items that already had a task in the project (skipped).
        recovered: items found in the project by their ``oodmon_id`` but missing from the
            side table (a push interrupted after Label Studio's import); now recorded.
        task_ids: item id -> task id of the items pushed now.
    """

    pushed: int
    already: int
    recovered: int
    task_ids: dict[str, int] = field(default_factory=dict)


def push(
    queue: LabelQueue,
    client: LabelStudioClient,
    project: int,
    *,
    status: str | None = "queued",
    model: str | None = None,
    limit: int | None = None,
    class_names: Sequence[str] | None = None,
    from_name: str = "label",
    to_name: str = "image",
    batch_size: int = 200,
    max_inline_bytes: int = 1_000_000,
    configure_sampling: bool = False,
) -> PushResult:
    """Create a task (with a prediction) per item not yet in the project, most OOD first.

    Args:
        queue: the label queue (opened writable: the task ids are recorded in it).
        client: the Label Studio client.
        project: the Label Studio project id (created with the labelling config of
            ``oodmon queue export --config-out``).
        status: which items by status (default: queued ones).
        model: only items of this model.
        limit: at most this many items.
        class_names: names for the predicted classes (as in the labelling config).
        from_name: the labelling config's ``<Choices>`` name.
        to_name: the labelling config's ``<Image>`` name.
        batch_size: tasks per import request.
        max_inline_bytes: refuse inline (data URI) inputs larger than this; store such
            inputs by reference (a URL) instead.
        configure_sampling: set the project to uncertainty sampling over these predictions
            (its ``model_version`` becomes the most-OOD item's ``model@version#calibration``).

    Raises:
        LabelStudioError: Label Studio unreachable or refusing a request.
        ValueError: an inline input larger than ``max_inline_bytes``.
    """
    if isinstance(project, bool) or not isinstance(project, int) or project < 1:
        raise ValueError(f"Expected `project` to be a positive integer id, but got {project!r}.")
    if batch_size < 1:
        raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size!r}.")
    client.project(project)  # fail early on a wrong id or credentials, before any write
    _ensure_table(queue)
    known = task_ids(queue, client.url, project)
    in_project = _tasks_by_item(client, project)
    missing = [(item, task) for item, task in in_project.items() if item not in known]
    _record(queue, client.url, project, missing, queue.clock())
    known.update(missing)

    pushed: dict[str, int] = {}
    already = 0
    tags: list[str] = []
    batch: list[tuple[QueueItem, dict[str, Any]]] = []

    def flush() -> None:
        ids = client.import_tasks(project, [task for _, task in batch])
        pairs = [(item.id, task) for (item, _), task in zip(batch, ids, strict=True)]
        _record(queue, client.url, project, pairs, queue.clock())
        pushed.update(pairs)
        batch.clear()

    for item in queue.iter_items(status, model=model, limit=limit, include_inputs=True):
        if item.id in known:
            already += 1
            continue
        task = label_studio_task(
            item, class_names=class_names, from_name=from_name, to_name=to_name
        )
        inline = task["data"].get(to_name)
        if (
            isinstance(inline, str)
            and inline.startswith("data:")
            and len(inline) > max_inline_bytes
        ):
            raise ValueError(
                f"Expected inline inputs of at most {max_inline_bytes} bytes, but item "
                f"{item.id!r} is {len(inline)} bytes as a data URI: queue large inputs by "
                "reference (a URL Label Studio can load), or raise `max_inline_bytes`."
            )
        if item.model_tag not in tags:
            tags.append(item.model_tag)
        batch.append((item, task))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    if configure_sampling and tags:
        client.update_project(project, sampling=UNCERTAINTY_SAMPLING, model_version=tags[0])
    return PushResult(pushed=len(pushed), already=already, recovered=len(missing), task_ids=pushed)


def _tasks_by_item(client: LabelStudioClient, project: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for task in client.tasks(project):
        item = (task.get("data") or {}).get("oodmon_id")
        if isinstance(item, str):
            found.setdefault(item, int(task["id"]))
    return found


# ---------------------------------------------------------------------- pull


@dataclass(frozen=True)
class Conflict:
    """An item labelled differently in the queue and in Label Studio."""

    item_id: str
    queue_label: str
    queue_labelled_at: float
    studio_label: str
    studio_labelled_at: float
    annotator: str
    kept: str  # "label-studio" or "queue": the later label

    def describe(self) -> str:
        return (
            f"conflict: item {self.item_id} is {self.queue_label!r} in the queue "
            f"({_iso(self.queue_labelled_at)}) and {self.studio_label!r} in Label Studio "
            f"({_iso(self.studio_labelled_at)}, by {self.annotator}); kept the later one "
            f"({self.kept})"
        )


@dataclass(frozen=True)
class PullResult:
    """What one pull did.

    Attributes:
        labelled: items marked done (or relabelled) from Label Studio now.
        unchanged: annotations already pulled, or agreeing with the queue.
        unknown: annotated tasks that match no item of this queue.
        conflicts: items labelled differently in both places (the later label kept).
    """

    labelled: int
    unchanged: int
    unknown: int
    conflicts: list[Conflict] = field(default_factory=list)


def pull(
    queue: LabelQueue,
    client: LabelStudioClient,
    project: int,
    *,
    from_name: str = "label",
) -> PullResult:
    """Bring the project's latest annotation of every pushed item back as a ``done`` label.

    The label is the annotation's first ``choices`` value of ``from_name``; the annotator
    (the user's email) becomes the item's ``claimed_by``. Cancelled (skipped) annotations and
    annotations without a choice are ignored. Idempotent: an annotation already pulled is
    not applied twice.

    Raises:
        LabelStudioError: Label Studio unreachable or refusing a request.
    """
    if isinstance(project, bool) or not isinstance(project, int) or project < 1:
        raise ValueError(f"Expected `project` to be a positive integer id, but got {project!r}.")
    _ensure_table(queue)
    by_task = {task: item for item, task in task_ids(queue, client.url, project).items()}
    pulled = _pulled(queue, client.url, project)
    users: dict[int, str] | None = None
    labelled = unchanged = unknown = 0
    conflicts: list[Conflict] = []
    for task in client.tasks(project):
        annotation = _latest_choice(task.get("annotations") or [], from_name)
        if annotation is None:
            continue
        item_id = by_task.get(int(task["id"]))
        if item_id is None:  # pushed by a run that died before recording it, or imported by hand
            item_id = (task.get("data") or {}).get("oodmon_id")
            if not isinstance(item_id, str) or queue.get(item_id, include_input=False) is None:
                unknown += 1
                continue
            _record(queue, client.url, project, [(item_id, int(task["id"]))], queue.clock())
        label, annotation_id, updated, updated_text, who = annotation
        if pulled.get(item_id) == (annotation_id, updated_text):
            unchanged += 1
            continue
        if users is None:
            users = _users_or_empty(client)
        annotator = (
            users.get(who, f"label-studio-user-{who}") if who is not None else "label-studio"
        )
        item = queue.get(item_id, include_input=False)
        if item is None:
            unknown += 1
            continue
        kept_queue = False
        if item.status == "done" and item.label is not None:
            if item.label == label:
                unchanged += 1
                _mark_pulled(queue, client.url, project, item_id, annotation_id, updated_text)
                continue
            kept_queue = (item.labelled_at or 0.0) > updated
            conflicts.append(
                Conflict(
                    item_id=item_id,
                    queue_label=item.label,
                    queue_labelled_at=item.labelled_at or 0.0,
                    studio_label=label,
                    studio_labelled_at=updated,
                    annotator=annotator,
                    kept="queue" if kept_queue else "label-studio",
                )
            )
        if not kept_queue:
            _label(queue, item_id, label, annotator)
            labelled += 1
        _mark_pulled(queue, client.url, project, item_id, annotation_id, updated_text)
    return PullResult(labelled=labelled, unchanged=unchanged, unknown=unknown, conflicts=conflicts)


def _label(queue: LabelQueue, item_id: str, label: str, annotator: str) -> None:
    # overwrite: pull has already decided that this annotation is the later label
    try:
        queue.done(item_id, label, worker=annotator, overwrite=True)
    except LeaseError:
        # someone claimed it in the queue but has not labelled it: the annotation wins
        queue.release(item_id)
        queue.done(item_id, label, worker=annotator, overwrite=True)
    except ItemNotFoundError:  # deleted meanwhile: nothing to label
        pass


def _latest_choice(
    annotations: Sequence[dict[str, Any]], from_name: str
) -> tuple[str, int, float, str, int | None] | None:
    """(label, annotation id, updated at (UTC s), its text, user id) of the latest annotation."""
    best: tuple[str, int, float, str, int | None] | None = None
    for a in annotations:
        if not isinstance(a, dict) or a.get("was_cancelled"):
            continue
        label = next(
            (
                r["value"]["choices"][0]
                for r in a.get("result") or []
                if r.get("from_name") == from_name
                and r.get("type") == "choices"
                and (r.get("value") or {}).get("choices")
            ),
            None,
        )
        if label is None:
            continue
        text = str(a.get("updated_at") or a.get("created_at") or "")
        when = _parse_time(text)
        who = a.get("completed_by")
        if isinstance(who, dict):
            who = who.get("id")
        candidate = (str(label), int(a["id"]), when, text, int(who) if who is not None else None)
        if best is None or (when, candidate[1]) > (best[2], best[1]):
            best = candidate
    return best


def _parse_time(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.inf if not text else 0.0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if math.isfinite(t) else "?"


def _users_or_empty(client: LabelStudioClient) -> dict[int, str]:
    try:
        return client.users()
    except LabelStudioError:  # a reviewer-only key may not list users: fall back to ids
        return {}


def _pulled(queue: LabelQueue, server: str, project: int) -> dict[str, tuple[int, str]]:
    with queue.transaction(write=False) as db:
        rows = db.query(
            f"SELECT item_id, annotation_id, annotation_updated FROM {TASKS_TABLE} "
            "WHERE server = ? AND project = ? AND annotation_id IS NOT NULL",
            (server, int(project)),
        )
    return {str(item): (int(a), str(u)) for item, a, u in rows}


def _mark_pulled(
    queue: LabelQueue, server: str, project: int, item_id: str, annotation_id: int, updated: str
) -> None:
    with queue.transaction(write=True) as db:
        db.execute(
            f"UPDATE {TASKS_TABLE} SET annotation_id = ?, annotation_updated = ? "
            "WHERE server = ? AND project = ? AND item_id = ?",
            (annotation_id, updated, server, int(project), item_id),
        )
