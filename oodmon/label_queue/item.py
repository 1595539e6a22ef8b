"""The values a label queue stores and returns: items, add results, counts.

A :class:`QueueItem` is one flagged input with its OOD evidence; :meth:`QueueItem.create`
validates the evidence and computes the content hash that deduplication keys on.
:func:`npy_bytes` is the one encoding of inputs (``np.save`` bytes, never pickle).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # NumPy loads when an input is encoded or decoded: queue commands start faster
    import numpy as np

__all__ = [
    "STATUSES",
    "AddResult",
    "QueueItem",
    "QueueStats",
    "finite_or_none",
    "format_utc",
    "npy_bytes",
]

STATUSES = ("queued", "claimed", "done")


@dataclass(frozen=True)
class QueueItem:
    """One input waiting for (or having received) a label.

    Attributes:
        id: the item id (caller-given or a random UUID hex).
        model, model_version: the model that flagged it (the most-OOD sighting's version).
        content_hash: SHA-256 hex of the input's ``.npy`` bytes (or of its reference).
        p_value: conformal p-value of the most-OOD sighting (smaller = more OOD).
        distance: distance to the OCS of that sighting (smaller = more OOD); ``inf`` if unknown.
        score: the detector's OOD score (higher = more OOD), or None.
        predicted: the model's predicted class, or -1.
        created_at, last_seen_at: UTC Unix seconds of the first and latest sighting.
        seen_count: how many times this input was flagged.
        input_npy: the input as ``np.save`` bytes, or None (reference only / not loaded).
        input_ref: a URI or key for the input, or None.
        input_size: bytes of the stored input, or None if none is stored (set on reads).
        calibration: the detector's calibration hash, if known.
        status: ``"queued"``, ``"claimed"`` or ``"done"`` (a lapsed claim reads as queued).
        claimed_by, lease_expires_at: the worker holding it and until when (UTC seconds).
        label, labelled_at: the label given with
            :meth:`~oodmon.label_queue.LabelQueue.done` and when.
    """

    id: str
    model: str
    model_version: str
    content_hash: str
    p_value: float
    distance: float
    score: float | None = None
    predicted: int = -1
    created_at: float = 0.0
    last_seen_at: float = 0.0
    seen_count: int = 1
    input_npy: bytes | None = field(default=None, repr=False)
    input_ref: str | None = None
    input_size: int | None = None
    calibration: str | None = None
    status: str = "queued"
    claimed_by: str | None = None
    lease_expires_at: float | None = None
    label: str | None = None
    labelled_at: float | None = None

    @property
    def input(self) -> np.ndarray | None:
        """The stored input as an array (``np.load``, no pickle), or None."""
        if self.input_npy is None:
            return None
        import numpy as np

        return np.load(io.BytesIO(self.input_npy), allow_pickle=False)

    @property
    def model_tag(self) -> str:
        """``model@version#calibration`` (``#calibration`` only when known)."""
        tag = f"{self.model}@{self.model_version}"
        return f"{tag}#{self.calibration}" if self.calibration else tag

    @classmethod
    def create(
        cls,
        *,
        model: str,
        version: str,
        p_value: float,
        distance: float,
        input: Any = None,
        reference: str | None = None,
        store_input: bool = True,
        score: float | None = None,
        predicted: int = -1,
        id: str | None = None,
        timestamp: float | None = None,
        calibration: str | None = None,
        input_npy: bytes | None = None,
    ) -> QueueItem:
        """Build an item from one flagged input and its evidence.

        Args:
            model: the model's name.
            version: the model's version.
            p_value: conformal p-value in [0, 1] (smaller = more OOD).
            distance: distance to the OCS (smaller = more OOD); NaN is stored as ``inf``.
            input: the input (tensor, array, nested list of numbers), or a ``str`` taken as
                its reference, or None.
            reference: a URI or key for the input (stored as ``input_ref``).
            store_input: False keeps only the reference; the input, if given, is still
                hashed so that duplicates are recognised.
            score: the detector's OOD score (higher = more OOD); non-finite is stored as None.
            predicted: the model's predicted class, or -1.
            id: the item id (default: a random UUID hex).
            timestamp: UTC Unix seconds of the sighting (default: now).
            calibration: the detector's calibration hash, if known.
            input_npy: the input already encoded with ``np.save`` (instead of ``input``).

        Raises:
            ValueError: missing model/version, a p-value outside [0, 1], or an input that
                cannot be stored as a plain numeric array.
        """
        for name, value in (("model", model), ("version", version)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"Expected `{name}` to be a non-empty string, but got {value!r}.")
        p = float(p_value)
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"Expected `p_value` in [0, 1], but got {p_value!r}.")
        d = float(distance)
        d = math.inf if math.isnan(d) else d
        s = None if score is None or not math.isfinite(float(score)) else float(score)
        if isinstance(input, str):
            reference = reference if reference is not None else input
            input = None
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"Expected `reference` to be a string, but got {reference!r}.")
        if id is not None and (not isinstance(id, str) or not id):
            raise ValueError(f"Expected `id` to be a non-empty string, but got {id!r}.")
        npy = input_npy if input is None else npy_bytes(input)
        if npy is not None:
            digest = hashlib.sha256(npy).hexdigest()
        elif reference is not None:
            digest = hashlib.sha256(b"ref:" + reference.encode()).hexdigest()
        elif id is not None:
            digest = hashlib.sha256(b"id:" + id.encode()).hexdigest()
        else:  # nothing identifies the input: never deduplicated
            digest = hashlib.sha256(b"uuid:" + uuid.uuid4().bytes).hexdigest()
        now = time.time() if timestamp is None else float(timestamp)
        return cls(
            id=id if id is not None else uuid.uuid4().hex,
            model=model,
            model_version=version,
            content_hash=digest,
            p_value=p,
            distance=d,
            score=s,
            predicted=int(predicted),
            created_at=now,
            last_seen_at=now,
            input_npy=npy if store_input else None,
            input_ref=reference,
            input_size=None if npy is None or not store_input else len(npy),
            calibration=calibration,
        )

    def to_json(self, include_input: bool = True) -> dict[str, Any]:
        """A JSON-ready dict of every field (input as base64 ``.npy``; inf/NaN as None)."""
        out: dict[str, Any] = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if name == "input_npy":
                if include_input:
                    out["input_npy_b64"] = (
                        None if value is None else base64.b64encode(value).decode("ascii")
                    )
                continue
            out[name] = finite_or_none(value) if isinstance(value, float) else value
        return out


_FIELDS = tuple(QueueItem.__dataclass_fields__)


def npy_bytes(value: Any) -> bytes:
    """``np.save`` bytes of a tensor, array or nested list (moved to the host; no pickle).

    Raises:
        ValueError: the value is not a plain numeric/boolean array.
    """
    # A tensor can only exist once torch is imported: the queue commands never import it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.to(torch.float32)
        value = t.cpu().numpy()
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(value))
    if arr.dtype.kind not in "biufc":
        raise ValueError(
            f"Expected a numeric input (tensor or array), but got dtype {arr.dtype}; "
            "pass a reference (a URI or key) for other kinds of input."
        )
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class AddResult:
    """What one :meth:`~oodmon.label_queue.LabelQueue.add` call did (one transaction).

    Attributes:
        ids: per given item, the id it is stored under (an existing id for a duplicate), or
            None when it was rejected because the queue was full of more-OOD items.
        added, merged, evicted, rejected: counts for this call.
        depth: queued items after the call.
    """

    ids: list[str | None]
    added: int = 0
    merged: int = 0
    evicted: int = 0
    rejected: int = 0
    depth: int = 0


@dataclass(frozen=True)
class QueueStats:
    """Counts of a label queue.

    Attributes:
        queued: items waiting (a lapsed claim counts here; see ``expired_leases``).
        claimed: items under a live lease.
        done: labelled items.
        expired_leases: claims whose lease lapsed (included in ``queued``).
        capacity: bound on open (queued + claimed) items.
        evicted: items evicted to make room, ever.
        rejected: new items turned away because the queue was full of more-OOD ones, ever.
        duplicates: sightings merged into an existing item (sum of seen_count - items).
        schema_version: the database's schema version.
    """

    queued: int
    claimed: int
    done: int
    expired_leases: int
    capacity: int
    evicted: int
    rejected: int
    duplicates: int
    schema_version: int

    @property
    def total(self) -> int:
        """Items in any status."""
        return self.queued + self.claimed + self.done

    def as_dict(self) -> dict[str, int]:
        """Every count by name, ``total`` included (what ``oodmon queue stats`` prints)."""
        return {
            "queued": self.queued,
            "claimed": self.claimed,
            "done": self.done,
            "total": self.total,
            "expired_leases": self.expired_leases,
            "capacity": self.capacity,
            "evicted": self.evicted,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "schema_version": self.schema_version,
        }


def format_utc(t: float | None) -> str:
    """A Unix time as ``YYYY-MM-DDTHH:MM:SSZ`` (``-`` for None), for tables and messages."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def finite_or_none(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (JSON has no NaN or infinity)."""
    return value if value is not None and math.isfinite(value) else None
