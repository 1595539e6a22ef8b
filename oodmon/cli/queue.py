"""``oodmon queue ...``: inspect, export and work a label queue from the shell.

    oodmon queue ls URL [--status queued|claimed|done] [--model M] [--limit N]
    oodmon queue stats URL [--json]
    oodmon queue export URL [-o FILE] [--format label-studio|jsonl] [--status S] [--limit N]
    oodmon queue claim URL --worker NAME [-n N] [--lease SECONDS] [-o FILE] [--format F]
    oodmon queue done URL ID LABEL [--worker NAME] [--force]
    oodmon queue release URL ID [--worker NAME]
    oodmon queue push URL --label-studio URL --project ID [--class-names A,B]
        [--uncertainty-sampling]
    oodmon queue pull URL --label-studio URL --project ID

``push`` and ``pull`` read the Label Studio API key from ``LABEL_STUDIO_API_KEY``.

URL is a file path, ``sqlite:///path.db`` or ``postgresql://user@host/db``. ``ls``,
``stats`` and ``export`` open the queue read-only (a file in a directory they may not write
to included). Every command takes ``--timeout`` (seconds to wait for a locked database or a
server). What comes from the queue (ids, labels, workers, references) is printed with its
control characters escaped, so that no stored string can drive the terminal or forge a row.

:func:`register` plugs the commands into the main ``oodmon`` parser; each handler returns an
exit code and raises, for the main CLI to print as one line: ``ValueError`` /
``FileNotFoundError`` / ``LookupError`` for input errors,
:class:`~oodmon.label_queue.QueueUnavailableError` (a ``ConnectionError``: busy, locked,
unreachable) or another :class:`~oodmon.errors.OodmonError` for runtime failures. Handlers
import the label queue when they run: the parser is built for every ``oodmon`` command,
``--version`` included, and the queue modules (HTTP and XML clients among them) are a third
of a light command's start-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from oodmon._atomic import atomic_write
from oodmon._printable import printable
from oodmon.cli._lazy import DeferredChoices

if TYPE_CHECKING:
    from oodmon.label_queue import LabelQueue, QueueItem

#: The export formats, read from the label queue when ``--format`` is checked or shown: the
#: parser is built for every command (``--version`` included), the queue only when one runs.
_FORMATS = DeferredChoices("oodmon.label_queue.export", "FORMATS", tuple)

__all__ = [
    "cmd_claim",
    "cmd_done",
    "cmd_export",
    "cmd_ls",
    "cmd_release",
    "cmd_stats",
    "format_items",
    "format_table",
    "register",
]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``queue`` command (and its subcommands) to an ``add_subparsers()`` object."""
    queue = subparsers.add_parser(
        "queue",
        help="inspect, export and label the queue of flagged inputs",
        description="Inspect, export and label a label queue (SQLite file or PostgreSQL URL).",
    )
    commands = queue.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=help)
        parser.add_argument(
            "url", metavar="URL", help="queue file path, sqlite:///path.db or postgresql://..."
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            help="seconds to wait for a locked database or a server (default 10)",
        )
        return parser

    ls = add("ls", "list items, most OOD first (read-only)")
    ls.add_argument("--status", choices=("queued", "claimed", "done"))
    ls.add_argument("--model")
    ls.add_argument("--limit", type=_count, default=50, help="rows to show (default 50; 0: all)")
    ls.set_defaults(handler=cmd_ls)

    stats = add("stats", "counts by status, capacity, evictions (read-only)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(handler=cmd_stats)

    export = add("export", "write Label Studio tasks or JSON Lines (read-only)")
    _add_output(export)
    export.add_argument("--status", choices=("queued", "claimed", "done"))
    export.add_argument("--model")
    export.add_argument("--limit", type=_count, default=0, help="items to export (0: all)")
    export.add_argument(
        "--config-out",
        help="also write the Label Studio labelling config XML here (needs --class-names)",
    )
    export.set_defaults(handler=cmd_export)

    claim = add("claim", "take the most-OOD queued items under a lease")
    claim.add_argument("--worker", required=True, help="who is labelling")
    claim.add_argument("-n", type=_positive, default=10, help="items to claim (default 10)")
    claim.add_argument(
        "--lease",
        type=float,
        default=3600.0,
        help="lease in seconds; unfinished items come back after it (default 3600)",
    )
    _add_output(claim, default=None)
    claim.set_defaults(handler=cmd_claim)

    done = add("done", "record the label of an item")
    done.add_argument("id", metavar="ID")
    done.add_argument("label", metavar="LABEL")
    done.add_argument("--worker", help="refuse if another worker holds a live lease on it")
    done.add_argument("--force", action="store_true", help="replace the label of an item")
    done.set_defaults(handler=cmd_done)

    release = add("release", "give a claimed item back to the queue")
    release.add_argument("id", metavar="ID")
    release.add_argument("--worker", help="refuse if another worker holds a live lease on it")
    release.set_defaults(handler=cmd_release)

    for name, help, handler in (
        ("push", "create Label Studio tasks for new queued items, most OOD first", cmd_push),
        ("pull", "bring Label Studio annotations back as labels", cmd_pull),
    ):
        parser = add(name, help)
        parser.add_argument(
            "--label-studio",
            required=True,
            metavar="URL",
            help="Label Studio server, e.g. http://localhost:8080",
        )
        parser.add_argument("--project", required=True, type=_positive, help="project id")
        parser.set_defaults(handler=handler)
        if name == "push":
            parser.add_argument("--class-names", help="comma-separated class names")
            parser.add_argument("--model")
            parser.add_argument("--limit", type=_count, default=0, help="items (0: all)")
            parser.add_argument(
                "--uncertainty-sampling",
                action="store_true",
                help="set the project to serve the lowest-confidence (most OOD) task first",
            )
    return queue


def _add_output(parser: argparse.ArgumentParser, default: str | None = "-") -> None:
    parser.add_argument(
        "-o", "--output", default=default, help="file to write ('-': standard output)"
    )
    parser.add_argument(
        "--format",
        choices=_FORMATS,
        default="label-studio",
        metavar="FORMAT",
        help="one of %(choices)s: Label Studio import JSON (default) or JSON Lines",
    )
    parser.add_argument(
        "--class-names", help="comma-separated class names, for Label Studio predictions"
    )


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _open(url: str, *, read_only: bool, timeout: float = 10.0) -> LabelQueue:
    from oodmon.label_queue import LabelQueue, QueueError

    if not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"Expected --timeout >= 0 seconds, but got {timeout!r}.")
    try:
        return LabelQueue(url, read_only=read_only, create=False, timeout=timeout)
    except ImportError as err:  # psycopg missing: say what to install, no traceback
        raise QueueError(str(err)) from err


# ---------------------------------------------------------------------- handlers


def cmd_ls(args: argparse.Namespace) -> int:
    """``oodmon queue ls``: a table of items, most OOD first."""
    with _open(args.url, read_only=True, timeout=args.timeout) as queue:
        items = queue.items(args.status, model=args.model, limit=args.limit or None)
        total = queue.stats()
    print(format_items(items))
    shown = f"{len(items)} of {total.total} items"
    print(f"{shown} ({total.queued} queued, {total.claimed} claimed, {total.done} done)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """``oodmon queue stats``: counts by status, capacity, evictions."""
    with _open(args.url, read_only=True, timeout=args.timeout) as queue:
        stats = queue.stats()
        url = printable(queue.url)
    if args.json:
        print(json.dumps({"url": url, **stats.as_dict()}, indent=1))
        return 0
    rows = [("queue", url), *((k, str(v)) for k, v in stats.as_dict().items())]
    print(format_table(["FIELD", "VALUE"], rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``oodmon queue export``: every matching item, most OOD first."""
    config = None
    if args.config_out:
        if args.format != "label-studio" or not args.class_names:
            raise ValueError(
                "Expected --class-names (and --format label-studio) with --config-out: the "
                "labelling config lists the class names."
            )
        from oodmon.label_queue.export import labelling_config

        config = labelling_config(_class_names(args) or [])
    from oodmon.label_queue import export_queue

    with _open(args.url, read_only=True, timeout=args.timeout) as queue:
        count = export_queue(
            queue,
            _destination(args),
            format=args.format,
            status=args.status,
            model=args.model,
            limit=args.limit or None,
            class_names=_class_names(args),
        )
    if config is not None:
        with atomic_write(args.config_out, encoding="utf-8") as fh:
            fh.write(config)
    if args.output != "-":
        print(f"wrote {count} items to {printable(args.output)} ({args.format})", file=sys.stderr)
    return 0


def cmd_claim(args: argparse.Namespace) -> int:
    """``oodmon queue claim``: lease the most-OOD queued items to a worker."""
    from oodmon.label_queue import format_utc, write_items

    with _open(args.url, read_only=False, timeout=args.timeout) as queue:
        items = queue.claim(args.n, args.worker, args.lease)
    if args.output is not None:
        write_items(items, _destination(args), format=args.format, class_names=_class_names(args))
    if args.output != "-":
        print(format_items(items))
        until = format_utc(items[0].lease_expires_at) if items else "-"
        print(f"claimed {len(items)} items for {printable(args.worker)} until {until}")
    return 0


def cmd_done(args: argparse.Namespace) -> int:
    """``oodmon queue done``: record an item's label."""
    with _open(args.url, read_only=False, timeout=args.timeout) as queue:
        item = queue.done(args.id, args.label, worker=args.worker, overwrite=args.force)
    print(f"{printable(item.id)}: labelled '{printable(item.label)}'")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """``oodmon queue release``: give a claimed item back."""
    with _open(args.url, read_only=False, timeout=args.timeout) as queue:
        queue.release(args.id, worker=args.worker)
    print(f"{printable(args.id)}: released")
    return 0


def _destination(args: argparse.Namespace) -> Any:
    return sys.stdout if args.output == "-" else args.output


def _class_names(args: argparse.Namespace) -> list[str] | None:
    return None if not args.class_names else [n.strip() for n in args.class_names.split(",")]


def cmd_push(args: argparse.Namespace) -> int:
    """``oodmon queue push``: send new queued items to a Label Studio project, most OOD first."""
    from oodmon.label_queue.label_studio import push

    client = _studio(args)
    with _open(args.url, read_only=False, timeout=args.timeout) as queue:
        result = push(
            queue,
            client,
            args.project,
            model=args.model,
            limit=args.limit or None,
            class_names=_class_names(args),
            configure_sampling=args.uncertainty_sampling,
        )
    recovered = f", {result.recovered} recovered" if result.recovered else ""
    print(
        f"pushed {result.pushed} items to project {args.project} "
        f"({result.already} already there{recovered})"
    )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """``oodmon queue pull``: bring Label Studio annotations back as done items."""
    from oodmon.label_queue.label_studio import pull

    client = _studio(args)
    with _open(args.url, read_only=False, timeout=args.timeout) as queue:
        result = pull(queue, client, args.project)
    for conflict in result.conflicts:
        print(conflict.describe(), file=sys.stderr)
    print(
        f"labelled {result.labelled} items from project {args.project} "
        f"({result.unchanged} unchanged, {result.unknown} unknown tasks, "
        f"{len(result.conflicts)} conflicts)"
    )
    return 0


def _studio(args: argparse.Namespace) -> Any:
    from oodmon.label_queue.label_studio import API_KEY_ENV, LabelStudioClient

    return LabelStudioClient(args.label_studio, os.environ.get(API_KEY_ENV, ""))


# ---------------------------------------------------------------------- tables


def format_items(items: Sequence[QueueItem]) -> str:
    """A readable table of items (no inputs); control characters in any cell are escaped."""
    from oodmon.label_queue import format_utc

    headers = [
        "ID",
        "STATUS",
        "P_VALUE",
        "DISTANCE",
        "PRED",
        "SEEN",
        "MODEL",
        "LAST_SEEN",
        "INPUT",
        "WORKER",
        "LABEL",
    ]
    rows = []
    for item in items:
        if item.input_ref is not None:
            source = item.input_ref
        elif item.input_size is not None or item.input_npy is not None:
            source = f"npy {item.input_size or len(item.input_npy or b'')} B"
        else:
            source = "-"
        rows.append(
            [
                item.id,
                item.status,
                f"{item.p_value:.3g}",
                f"{item.distance:.4g}",
                str(item.predicted),
                str(item.seen_count),
                item.model_tag,
                format_utc(item.last_seen_at),
                _clip(source, 40),
                item.claimed_by or "-",
                item.label or "-",
            ]
        )
    return format_table(headers, rows) if rows else "(no items)"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns under ``headers``, two spaces apart (no trailing spaces).

    Cells are printed with control characters escaped: one row per line, always.
    """
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *rows]
    ]
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
