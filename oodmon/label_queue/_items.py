"""Flagged rows -> queue items: the conversion the writer runs on its own thread.

A Monitor hands over an :class:`~oodmon.verdict.Observation` (verdict, inputs, ids) with the
inputs possibly still on the device; turning its rows into
:class:`~oodmon.label_queue.QueueItem` objects (the one device-to-host copy, the ``.npy``
encoding) is kept out of the inference path and out of the writer's buffering logic. The
Kafka consumer converts its rows with the same code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from oodmon.label_queue.item import QueueItem, npy_bytes
from oodmon.verdict import Observation

__all__ = ["convert_rows", "iter_items", "most_ood", "observation_items"]

# convert_rows pauses this long every _YIELD_EVERY rows it converts.
_YIELD_EVERY = 32
_YIELD_SECONDS = 1e-4


def observation_items(
    observation: Observation, *, store_inputs: bool = True, calibration: str | None = None
) -> tuple[list[QueueItem], int]:
    """Queue items for every row of an Observation (inputs moved to the host here).

    Args:
        observation: flagged rows as the Monitor hands them over.
        store_inputs: False keeps only references (a ``str`` input, else the row's id).
        calibration: calibration hash stored with each item.

    Returns:
        The items, and how many rows could not be converted (skipped).

    Raises:
        ValueError: the inputs or ids do not have one entry per row.
    """
    items = list(iter_items(observation, store_inputs=store_inputs, calibration=calibration))
    good = [item for item in items if item is not None]
    return good, len(items) - len(good)


def convert_rows(
    chunk: Sequence[Observation], *, store_inputs: bool, calibration: str | None
) -> tuple[list[QueueItem], dict[tuple[str, str], int]]:
    """Queue items of every row of ``chunk``, and the rows that could not be converted.

    Never raises for a bad row: an unconvertible row, or the rest of an Observation whose
    inputs or ids do not match its rows, is counted under its ``(model, version)``.
    """
    items: list[QueueItem] = []
    bad: dict[tuple[str, str], int] = {}
    for observation in chunk:
        key = (observation.model, observation.version)
        made = 0
        try:
            for item in iter_items(observation, store_inputs=store_inputs, calibration=calibration):
                made += 1
                if item is None:
                    bad[key] = bad.get(key, 0) + 1
                else:
                    items.append(item)
                if made % _YIELD_EVERY == 0:
                    # Python work here holds the GIL; an inference thread that released it
                    # (any torch op) would wait up to the 5 ms switch interval to get it
                    # back. A short sleep hands it over at once.
                    time.sleep(_YIELD_SECONDS)
        except (ValueError, TypeError):  # the rows not reached are lost
            bad[key] = bad.get(key, 0) + len(observation) - made
    return items, bad


def iter_items(
    observation: Observation, *, store_inputs: bool, calibration: str | None
) -> Iterator[QueueItem | None]:
    """One item per row, or None for a row that cannot be stored.

    Raises:
        ValueError: the inputs or ids do not have one entry per row.
    """
    n = len(observation)
    verdict = observation.verdict
    rows = _input_rows(observation.inputs, n)
    ids = observation.ids
    if ids is not None and len(ids) != n:
        raise ValueError(f"Expected {n} ids (one per row), but got {len(ids)}.")
    # rows of one array share their .npy header: encode it once (same bytes as np.save)
    header = None
    if isinstance(rows, np.ndarray) and rows.dtype.kind in "biufc" and n:
        first = np.ascontiguousarray(rows[0])
        header = npy_bytes(first)[: -first.nbytes or None]
    for i in range(n):
        item_id = None if ids is None or ids[i] is None else str(ids[i])
        value = rows[i]
        reference = None
        npy = None
        if isinstance(value, str):
            reference, value = value, None
        elif header is not None:
            npy, value = header + np.ascontiguousarray(value).tobytes(), None
        if not store_inputs and reference is None:
            reference = item_id
        try:
            yield QueueItem.create(
                model=observation.model,
                version=observation.version,
                p_value=float(verdict.p_value[i]),
                distance=float(verdict.distance[i]),
                score=float(verdict.score[i]),
                predicted=int(verdict.predicted[i]),
                input=value,
                input_npy=npy,
                reference=reference,
                store_input=store_inputs,
                id=item_id,
                timestamp=observation.timestamp,
                calibration=calibration,
            )
        except (ValueError, TypeError):
            yield None


def most_ood(observation: Observation, keep: int) -> Observation:
    """The ``keep`` most-OOD rows (smallest p-value, then distance), in their original order."""
    verdict = observation.verdict
    order = np.lexsort((verdict.distance, verdict.p_value))[:keep]
    return observation.take(np.sort(order))


def _input_rows(inputs: Any, n: int) -> Sequence[Any]:
    if inputs is None:
        return [None] * n
    if isinstance(inputs, torch.Tensor):
        t = inputs.detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.to(torch.float32)
        inputs = t.cpu().numpy()  # the one device-to-host copy, on the writer thread
    if isinstance(inputs, np.ndarray) and inputs.ndim == 0:
        raise ValueError("Expected one input per row, but got a 0-d array.")
    if len(inputs) != n:
        raise ValueError(f"Expected {n} inputs (one per row), but got {len(inputs)}.")
    return inputs
