"""``oodmon sidecar``: serve the CloudEvents receiver (:mod:`oodmon.sidecar`) with uvicorn.

Kept apart from the other commands so that ``oodmon --help`` stays fast: uvicorn and the
cloudevents SDK are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["DEFAULT_ADDR", "DEFAULT_PORT", "cmd_sidecar", "register"]

#: Where the sidecar listens unless told otherwise (loopback: exposing it is a choice).
DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 8080
#: Model label of a default ``--detector PATH`` when ``--model`` is not given.
DEFAULT_MODEL = "default"
DEFAULT_VERSION = "v1"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sidecar`` command to the ``oodmon`` parser's subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "sidecar",
        help="receive a model server's payload-log CloudEvents and monitor them",
        description="Serve POST / for KServe/Seldon payload-logger CloudEvents (binary or "
        "structured mode): responses are scored by the model's detector and answered with "
        "the verdict as Open Inference Protocol outputs; requests are joined to their "
        "responses so that flagged rows reach the label queue with their inputs. Also "
        "GET /metrics (Prometheus), GET /healthz and GET /ready.",
        epilog="Example: oodmon sidecar --detector detector.json --queue labels.db "
        "--model my-model --addr 0.0.0.0",
    )
    parser.add_argument(
        "--detector", action="append", required=True, metavar="[MODEL[:VERSION]=]PATH",
        help="Detector JSON; PATH alone is the default detector, MODEL=PATH scores only "
        "that model's events (repeatable)",
    )  # fmt: skip
    parser.add_argument("--addr", default=DEFAULT_ADDR, help=f"listen address ({DEFAULT_ADDR})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    parser.add_argument("--queue", help="label-queue URL or SQLite path for flagged rows")
    parser.add_argument(
        "--model", help="model label of the default detector; with it, the default detector "
        f"scores only events naming this model or none (default label: {DEFAULT_MODEL!r}, "
        "scoring every model without a detector of its own)",
    )  # fmt: skip
    parser.add_argument(
        "--version", dest="model_version", default=DEFAULT_VERSION,
        help=f"model_version label for detectors given without :VERSION ({DEFAULT_VERSION})",
    )  # fmt: skip
    parser.add_argument("--output", help="output tensor to score when a response has several")
    parser.add_argument("--input", help="input tensor kept for the label queue (default: first)")
    parser.add_argument(
        "--max-body-bytes", type=int, default=None,
        help="larger request bodies are refused with 413 (default 32 MiB)",
    )  # fmt: skip
    parser.add_argument("--reply-url", help="also post each verdict there as a CloudEvent")
    parser.add_argument(
        "--join-seconds", type=float, default=30.0,
        help="how long a request waits for its response (30)",
    )  # fmt: skip
    parser.add_argument(
        "--join-entries", type=int, default=10_000, help="requests held at most (10000)"
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads for scoring (1: batches here are small, and spare "
        "threads would spin against the event loop for the same cores)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (warning)")
    parser.set_defaults(handler=cmd_sidecar)
    return parser


def build_sidecar(args: argparse.Namespace) -> Any:
    """The :class:`~oodmon.sidecar.Sidecar` the arguments describe (detectors loaded)."""
    from oodmon.detector import Detector
    from oodmon.sidecar import DEFAULT_MAX_BODY_BYTES, DetectorRoute, Sidecar, parse_detector_spec

    routes = []
    for spec in args.detector:
        model, version, path = parse_detector_spec(spec)
        try:
            detector = Detector.load(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"detector file not found: {path}") from err
        default = model is None
        routes.append(
            DetectorRoute(
                detector=detector,
                model=(args.model or DEFAULT_MODEL) if default else str(model),
                version=version or args.model_version,
                match_version=version,
                default=default,
            )
        )
    return Sidecar(
        routes,
        queue=args.queue,
        output=args.output,
        input=args.input,
        strict_default=args.model is not None,
        max_body_bytes=(
            DEFAULT_MAX_BODY_BYTES if args.max_body_bytes is None else args.max_body_bytes
        ),
        reply_url=args.reply_url,
        join_entries=args.join_entries,
        join_seconds=args.join_seconds,
    )


def cmd_sidecar(args: argparse.Namespace) -> int:
    """Run the sidecar until interrupted (uvicorn handles SIGINT/SIGTERM gracefully)."""
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise ValueError(f"Expected --port in [0, 65535], but got {args.port}.")
    if args.threads < 1:
        raise ValueError(f"Expected --threads >= 1, but got {args.threads}.")
    import torch

    torch.set_num_threads(args.threads)
    sidecar = build_sidecar(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    print(
        f"oodmon sidecar: listening on http://{args.addr}:{args.port} for "
        + ", ".join(f"{m}:{v}" for m, v in sidecar.models),
        flush=True,
    )
    uvicorn.run(
        sidecar,
        host=args.addr,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    return 0
