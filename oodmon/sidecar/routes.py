"""Which detector scores an event: the sidecar's routes by model name and version.

Each route binds a fitted detector to the labels its metrics carry, the
:class:`~oodmon.monitor.Monitor` that scores for it, the identity its verdicts report and
the label-queue writer its flagged rows go to. One route may be the default for events that
name no model (or a model without a route of its own).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from oodmon.detector import Detector
from oodmon.label_queue import QueueWriter
from oodmon.metrics import PrometheusMetrics
from oodmon.monitor import Monitor
from oodmon.oip import DetectorIdentity
from oodmon.sidecar._http import Refused

__all__ = ["DetectorRoute", "Route", "RouteTable", "parse_detector_spec"]


@dataclass(frozen=True)
class DetectorRoute:
    """Which events a detector scores, and the labels its metrics carry.

    Attributes:
        detector: the fitted detector.
        model: the ``model`` label (and the model name matched when ``match`` is True).
        version: the ``model_version`` label.
        match_version: only events of this model version (None: any version).
        default: the catch-all route for events naming no model, or a model with no route
            of its own (unless ``strict_default``).
    """

    detector: Detector
    model: str
    version: str
    match_version: str | None = None
    default: bool = False


def parse_detector_spec(spec: str) -> tuple[str | None, str | None, str]:
    """``PATH``, ``MODEL=PATH`` or ``MODEL:VERSION=PATH`` -> ``(model, version, path)``.

    Raises:
        ValueError: an empty model name or path.
    """
    model: str | None = None
    version: str | None = None
    path = spec
    head, sep, tail = spec.partition("=")
    if sep and head and os.sep not in head:
        model, _, version_text = head.partition(":")
        version = version_text or None
        path = tail
        if not model:
            raise ValueError(f"Expected --detector MODEL[:VERSION]=PATH, but got {spec!r}.")
    if not path:
        raise ValueError(
            f"Expected --detector PATH or MODEL[:VERSION]=PATH with a path, but got {spec!r}."
        )
    return model, version, path


@dataclass
class Route:
    """A :class:`DetectorRoute` at work: its monitor, verdict identity and queue writer."""

    spec: DetectorRoute
    monitor: Monitor
    identity: DetectorIdentity
    writer: QueueWriter | None


class RouteTable:
    """The sidecar's routes, looked up by an event's model name and version.

    Args:
        specs: one :class:`DetectorRoute` per (model, version); at most one ``default``.
        metrics: the metric families every route's monitor records into.
        queue: label-queue URL or path for flagged rows (None: no queue).
        strict_default: the default route scores only events that name no model or its own
            model name, instead of every model without a route.

    Raises:
        ValueError: no routes, two routes for one model and version, or two defaults.
    """

    def __init__(
        self,
        specs: Sequence[DetectorRoute],
        *,
        metrics: PrometheusMetrics,
        queue: str | None = None,
        strict_default: bool = False,
    ) -> None:
        if not specs:
            raise ValueError("Expected at least one detector route, but got none.")
        self.metrics = metrics
        self.strict_default = strict_default
        self._routes: dict[tuple[str, str | None], Route] = {}
        self._default: Route | None = None
        for spec in specs:
            self._add(spec, queue)

    def _add(self, spec: DetectorRoute, queue_url: str | None) -> None:
        key = (spec.model, spec.match_version)
        if spec.default:
            if self._default is not None:
                raise ValueError(
                    "Expected at most one default --detector PATH (without MODEL=), but got two."
                )
        elif key in self._routes:
            raise ValueError(
                f"Expected one detector per model and version, but got two for "
                f"{spec.model}{':' + spec.match_version if spec.match_version else ''}."
            )
        detector = spec.detector
        writer = (
            QueueWriter(queue_url, calibration=detector.calibration_hash_)
            if queue_url is not None
            else None
        )
        monitor = Monitor(detector, spec.model, spec.version, metrics=self.metrics)
        identity = DetectorIdentity(
            score=detector.score,
            alpha=detector.alpha,
            calibration_hash=detector.calibration_hash_,
            model=spec.model,
            model_version=spec.version,
        )
        route = Route(spec, monitor, identity, writer)
        if spec.default:
            self._default = route
        else:
            self._routes[key] = route

    def find(self, name: str | None, version: str | None) -> Route:
        """The route of an event naming model ``name`` (None: none) at ``version``.

        Raises:
            Refused: 404 ``unknown_model``, naming the models that have a detector.
        """
        if name is not None:
            route = self._routes.get((name, version)) or self._routes.get((name, None))
            if route is not None:
                return route
        default = self._default
        if default is not None and (
            name is None or not self.strict_default or name == default.spec.model
        ):
            return default
        known = sorted({model for model, _ in self._routes})
        if default is not None:
            known.append(default.spec.model)
        raise Refused(
            404,
            "unknown_model",
            f"Expected an event for a model with a detector ({', '.join(known)}), but got "
            + (
                f"model {name!r}" + (f" version {version!r}" if version else "")
                if name is not None
                else "an event that names no model (no model_name, no inferenceservicename)"
            )
            + ": start the sidecar with --detector MODEL=PATH for it.",
        )

    def __iter__(self) -> Iterator[Route]:
        """Every route, the default last."""
        yield from self._routes.values()
        if self._default is not None:
            yield self._default

    @property
    def models(self) -> list[tuple[str, str]]:
        """The (model, version) labels of every route."""
        return [(r.spec.model, r.spec.version) for r in self]

    def close(self, timeout: float = 10.0) -> None:
        """Close every route's monitor and flush its label-queue writer."""
        for route in self:
            route.monitor.close()
            if route.writer is not None:
                route.writer.close(timeout)
