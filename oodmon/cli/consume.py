"""``oodmon consume``: score payload logs from Kafka as one member of a consumer group.

    oodmon consume --bootstrap-servers HOST:PORT --topic T [--topic T2 ...] [--group oodmon]
        --detector PATH [--detector MODEL=PATH ...] [--queue URL] [--metrics-port P]
        [--metrics-addr 127.0.0.1] [--dead-letter-topic T] [--max-poll N] [--output NAME]
        [-X KEY=VALUE ...]

Runs until SIGTERM or SIGINT, then finishes the batch in hand, commits it, leaves the group
and exits 0. :func:`register` plugs the command into the main ``oodmon`` parser.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oodmon.detector import Detector

__all__ = ["cmd_consume", "parse_detectors", "register"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``consume`` command to an ``add_subparsers()`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "consume",
        help="score model payload logs from Kafka (a consumer group; pip install oodmon[kafka])",
        description="Read inference requests and responses logged to Kafka (KServe CloudEvents, "
        "Seldon Core v2 topics; JSON Open Inference Protocol), score the responses in batches, "
        "export /metrics and write flagged rows to the label queue. Offsets are committed only "
        "after that (at least once). Run several with one --group to share the partitions.",
    )
    parser.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--topic", action="append", required=True, dest="topics", help="topic to read (repeat)"
    )
    parser.add_argument("--group", default="oodmon", help="consumer group (default oodmon)")
    parser.add_argument(
        "--detector",
        action="append",
        required=True,
        dest="detectors",
        metavar="[MODEL=]PATH",
        help="Detector JSON; MODEL=PATH for one model, PATH for any other (repeat)",
    )
    parser.add_argument("--queue", help="label-queue URL (SQLite path or postgresql://...)")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics here (0: any free port)")
    parser.add_argument("--metrics-addr", default="127.0.0.1", help="address for /metrics")
    parser.add_argument("--dead-letter-topic", help="where unusable messages go, unchanged")
    parser.add_argument(
        "--max-poll", type=int, default=500, help="messages per poll and batch (default 500)"
    )
    parser.add_argument("--output", help="response tensor to score when there are several")
    parser.add_argument(
        "-X",
        action="append",
        default=[],
        dest="kafka",
        metavar="KEY=VALUE",
        help="librdkafka consumer setting, e.g. -X security.protocol=SASL_SSL (repeat)",
    )
    parser.set_defaults(handler=cmd_consume)
    return parser


def parse_detectors(specs: list[str]) -> dict[str | None, Detector]:
    """``["PATH", "MODEL=PATH", ...]`` -> {None: default, "MODEL": detector}.

    Raises:
        ValueError: two detectors for one model, or an empty model name.
        FileNotFoundError: a detector file that does not exist.
    """
    from oodmon.detector import Detector  # torch: only when the command runs (see oodmon.cli)

    detectors: dict[str | None, Detector] = {}
    for spec in specs:
        model: str | None = None
        path = spec
        if "=" in spec:
            model, path = spec.split("=", 1)
            if not model:
                raise ValueError(f"Expected --detector MODEL=PATH, but got {spec!r}.")
        if model in detectors:
            what = f"model {model!r}" if model else "the default (PATH without MODEL=)"
            raise ValueError(f"Expected one --detector for {what}, but got several.")
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"detector file not found: {file}")
        detectors[model] = Detector.load(file)
    return detectors


def _settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Expected -X KEY=VALUE, but got {pair!r}.")
        settings[key] = value
    return settings


def cmd_consume(args: argparse.Namespace) -> int:
    """Run the consumer until SIGTERM/SIGINT; 0 after a clean stop."""
    from oodmon.consume import ConsumeConfig, QueueRefusedError, ScoringConsumer

    config = ConsumeConfig(
        bootstrap_servers=args.bootstrap_servers,
        topics=tuple(args.topics),
        detectors=parse_detectors(args.detectors),
        group=args.group,
        queue=args.queue,
        dead_letter_topic=args.dead_letter_topic,
        max_poll=args.max_poll,
        output=args.output,
        kafka=_settings(args.kafka),
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    consumer = ScoringConsumer(config)
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.metrics_port is not None:
            server = consumer.serve_metrics(args.metrics_port, args.metrics_addr)
            print(f"oodmon consume: metrics at {server.url}", file=sys.stderr, flush=True)
        print(
            f"oodmon consume: reading {', '.join(config.topics)} as group {config.group!r}",
            file=sys.stderr,
            flush=True,
        )
        try:
            batches = consumer.run(stop)
        except QueueRefusedError as err:
            print(f"oodmon: error: {err}", file=sys.stderr)
            return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"oodmon consume: stopped after {batches} committed batches", file=sys.stderr)
    return 0
