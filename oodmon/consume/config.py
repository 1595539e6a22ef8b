"""What ``oodmon consume`` was asked to do, checked, and the Kafka client settings it implies."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from oodmon.detector import Detector

__all__ = ["ConsumeConfig"]


@dataclass(frozen=True)
class ConsumeConfig:
    """What ``oodmon consume`` was asked to do.

    Attributes:
        bootstrap_servers: ``HOST:PORT[,HOST:PORT...]`` of the Kafka cluster.
        topics: topics to read (payload logs).
        detectors: model name -> detector; the key None is the default for any other model.
        group: the consumer group (every member of one group shares the partitions).
        queue: label-queue URL for flagged rows, or None.
        dead_letter_topic: where rejected messages go, unchanged, or None.
        max_poll: messages per poll (one detector call per model per poll).
        poll_timeout: seconds a poll waits for messages.
        output: the response tensor to score when a response holds several.
        join_entries: requests the join buffer holds at most.
        join_seconds: seconds a request waits for its response at most.
        store_inputs: keep flagged rows' inputs in the queue (else only their ids).
        kafka: extra librdkafka settings for the consumer (``-X key=value``).
    """

    bootstrap_servers: str
    topics: tuple[str, ...]
    detectors: Mapping[str | None, Detector]
    group: str = "oodmon"
    queue: str | None = None
    dead_letter_topic: str | None = None
    max_poll: int = 500
    poll_timeout: float = 0.5
    output: str | None = None
    join_entries: int = 10_000
    join_seconds: float = 60.0
    store_inputs: bool = True
    kafka: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap_servers, str) or not self.bootstrap_servers:
            raise ValueError(
                f"Expected `bootstrap_servers` as HOST:PORT, but got {self.bootstrap_servers!r}."
            )
        if not self.topics or not all(isinstance(t, str) and t for t in self.topics):
            raise ValueError(f"Expected at least one topic name, but got {self.topics!r}.")
        if not self.detectors:
            raise ValueError("Expected at least one detector (--detector PATH or MODEL=PATH).")
        for name, value in (("max_poll", self.max_poll), ("join_entries", self.join_entries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        for name, seconds in (
            ("poll_timeout", self.poll_timeout),
            ("join_seconds", self.join_seconds),
        ):
            if not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
                raise ValueError(f"Expected `{name}` > 0 seconds, but got {seconds!r}.")
        if self.dead_letter_topic is not None and self.dead_letter_topic in self.topics:
            raise ValueError(
                f"Expected a dead-letter topic other than the topics read, but got "
                f"{self.dead_letter_topic!r}: rejected messages would be read again."
            )

    def consumer_settings(self) -> dict[str, Any]:
        """Settings of the librdkafka consumer: manual commits, start at the earliest offset."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group,
            "client.id": f"oodmon-consume-{socket.gethostname()}-{os.getpid()}",
            # offsets are committed by hand after the queue accepted the batch's flags
            "enable.auto.commit": False,
            # a new group reads what is already there: nothing logged before it started is lost
            "auto.offset.reset": "earliest",
            **self.kafka,
        }

    def producer_settings(self) -> dict[str, Any]:
        """Settings of the dead-letter producer: the connection and security ones only."""
        shared = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.")
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "enable.idempotence": True,
            **{k: v for k, v in self.kafka.items() if k.startswith(shared)},
        }
