"""Label-queue exports: Label Studio import JSON, JSON Lines, and the PNG encoding they use.

One path serves the API and ``oodmon queue export``: :func:`export_queue` reads a queue
page by page and hands the items to :func:`write_items`, which ``oodmon queue claim -o``
uses for the items it claimed.

Label Studio tasks carry the input (a PNG data URI for image-like inputs, else the array or
its reference) and the OOD evidence in ``data``, and a prediction whose ``model_version``
names the model, version and calibration. Its ``score`` is a *confidence*, low = most OOD
(:func:`task_confidence`): Label Studio reads prediction scores as the model's confidence, and
its "Uncertainty sampling" serves the lowest score first, so the most-OOD task comes first.
:func:`labelling_config` writes the matching labelling config (an ``<Image>`` and a
``<Choices>`` of the class names) to create the project from.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

from oodmon._atomic import atomic_write
from oodmon.label_queue.item import QueueItem, finite_or_none
from oodmon.label_queue.store import LabelQueue

if TYPE_CHECKING:  # NumPy is imported where images are encoded: queue commands start faster
    import numpy as np

__all__ = [
    "FORMATS",
    "export_queue",
    "label_studio_task",
    "png_bytes",
    "write_items",
    "write_jsonl",
    "write_label_studio",
]

#: Export formats: Label Studio import JSON (a list of tasks), or JSON Lines (every field).
FORMATS = ("label-studio", "jsonl")


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a grayscale or RGB image array as an 8-bit PNG (zlib + struct; no imaging library).

    Grayscale is ``[H, W]``, ``[1, H, W]`` or ``[H, W, 1]``; RGB is ``[3, H, W]`` or
    ``[H, W, 3]``.

    uint8 is written as is; floats in [0, 1] are scaled by 255; anything else is min-max
    normalised to [0, 255].

    Raises:
        ValueError: the array is not image-shaped.
    """
    import numpy as np

    arr = _image_layout(np.asarray(image))
    if arr is None:
        raise ValueError(
            f"Expected an image array [H, W] or [C, H, W], but got shape {np.asarray(image).shape}."
        )
    pixels = _to_uint8(arr)
    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _image_layout(arr: np.ndarray) -> np.ndarray | None:
    """``[H, W]`` or ``[H, W, 3]`` view of an image-like array, or None if not image-like."""
    import numpy as np

    if arr.dtype.kind not in "biuf":
        return None
    if arr.ndim == 3:
        if arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
            arr = np.moveaxis(arr, 0, -1)
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        elif arr.shape[2] != 3:
            return None
    if arr.ndim not in (2, 3) or arr.shape[0] < 2 or arr.shape[1] < 2:
        return None
    return arr


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    import numpy as np

    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    x = arr.astype(np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    lo, hi = float(x.min()), float(x.max())
    if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        x = x * 255.0
    elif arr.dtype.kind in "iu" and lo >= 0 and hi <= 255:
        pass
    elif hi > lo:
        x = (x - lo) * (255.0 / (hi - lo))
    else:
        x = np.zeros_like(x)
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def label_studio_task(
    item: QueueItem,
    *,
    class_names: Sequence[str] | None = None,
    from_name: str = "label",
    to_name: str = "image",
) -> dict[str, Any]:
    """One Label Studio import task for ``item``.

    ``data[to_name]`` is a ``data:image/png;base64`` URI for image-like inputs, else the
    reference; a non-image input without a reference goes to ``data["input"]`` as a list.
    The OOD evidence (p-value, distance, OOD score, calibration) sits in ``data`` too.
    ``predictions[0]`` carries ``model_version = "model@version#calibration"``, the
    confidence of :func:`task_confidence` as ``score`` (low = most OOD, so that Label Studio's
    uncertainty sampling serves the most-OOD task first), and the model's predicted class as
    a ``choices`` result.
    """
    data: dict[str, Any] = {}
    array = item.input
    layout = None if array is None else _image_layout(array)
    if layout is not None:
        png = base64.b64encode(png_bytes(layout)).decode("ascii")
        data[to_name] = f"data:image/png;base64,{png}"
    elif item.input_ref is not None:
        data[to_name] = item.input_ref
    elif array is not None:
        import numpy as np

        data["input"] = (
            np.where(np.isfinite(array), array, 0).tolist()
            if array.dtype.kind == "f"
            else array.tolist()
        )
    if item.input_ref is not None:
        data["oodmon_ref"] = item.input_ref
    data.update(
        oodmon_id=item.id,
        distance=finite_or_none(item.distance),
        p_value=item.p_value,
        score=finite_or_none(item.score),
        predicted=item.predicted,
        seen_count=item.seen_count,
        model=item.model,
        model_version=item.model_version,
        calibration=item.calibration,
    )
    result: list[dict[str, Any]] = []
    if item.predicted >= 0:
        name = (
            class_names[item.predicted]
            if class_names is not None and item.predicted < len(class_names)
            else str(item.predicted)
        )
        result.append(
            {
                "from_name": from_name,
                "to_name": to_name,
                "type": "choices",
                "value": {"choices": [name]},
            }
        )
    prediction = {"model_version": item.model_tag, "score": task_confidence(item), "result": result}
    return {"data": data, "predictions": [prediction]}


#: Distance ties move a confidence by less than this (far below the p-value grid 1/(n+1)).
_TIE_BREAK = 1e-9


def task_confidence(item: QueueItem) -> float:
    """The prediction score Label Studio sorts by: low = least trustworthy = most OOD.

    ``p_value + 1e-9 * d / (1 + d)`` for distance ``d`` (``+1e-9`` for an unknown distance):
    the p-value, nudged by less than 1e-9 so that equal p-values (common at the smallest
    reachable p-value, 1/(n+1)) order like the queue, smaller distance first. Lowest-first
    therefore follows the queue's priority for calibration sets below 10**9 samples.
    """
    d = item.distance
    nudge = 1.0 if not math.isfinite(d) else max(d, 0.0) / (1.0 + max(d, 0.0))
    return float(item.p_value + _TIE_BREAK * nudge)


def labelling_config(
    class_names: Sequence[str], *, from_name: str = "label", to_name: str = "image"
) -> str:
    """Label Studio labelling config XML for the exported tasks: an image and one choice.

    Raises:
        ValueError: no class names, an empty or a repeated one.
    """
    names = [str(n) for n in class_names]
    if not names or any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"Expected distinct, non-empty class names, but got {names!r}; pass them as "
            "--class-names a,b,c in the order of the model's outputs."
        )
    choices = "\n".join(f"    <Choice value={quoteattr(n)}/>" for n in names)
    return (
        f"<View>\n  <Image name={quoteattr(to_name)} value={quoteattr('$' + to_name)}/>\n"
        f'  <Choices name={quoteattr(from_name)} toName={quoteattr(to_name)} choice="single" '
        f'showInLine="true">\n{choices}\n  </Choices>\n</View>\n'
    )


@contextlib.contextmanager
def _text_destination(dest: str | os.PathLike[str] | IO[str]) -> Iterator[IO[str]]:
    """An open text file for ``dest``, written atomically when ``dest`` is a path.

    A failed export leaves the previous file as it was; an open file is used as is and left
    open.
    """
    if isinstance(dest, (str, os.PathLike)):
        with atomic_write(dest, encoding="utf-8") as fh:
            yield fh
    else:
        yield dest


def write_label_studio(
    items: Iterable[QueueItem],
    dest: str | os.PathLike[str] | IO[str],
    *,
    class_names: Sequence[str] | None = None,
    from_name: str = "label",
    to_name: str = "image",
) -> int:
    """Stream ``items`` as a Label Studio task list to a path or text file. Returns the count."""
    count = 0
    with _text_destination(dest) as fh:
        fh.write("[")
        for item in items:
            task = label_studio_task(
                item, class_names=class_names, from_name=from_name, to_name=to_name
            )
            fh.write(("\n" if count == 0 else ",\n") + json.dumps(task, allow_nan=False))
            count += 1
        fh.write("\n]\n" if count else "]\n")
    return count


def write_jsonl(
    items: Iterable[QueueItem],
    dest: str | os.PathLike[str] | IO[str],
    *,
    include_inputs: bool = True,
) -> int:
    """Stream ``items`` as JSON Lines (see :meth:`QueueItem.to_json`). Returns the count."""
    count = 0
    with _text_destination(dest) as fh:
        for item in items:
            fh.write(json.dumps(item.to_json(include_input=include_inputs), allow_nan=False))
            fh.write("\n")
            count += 1
    return count


def write_items(
    items: Iterable[QueueItem],
    dest: str | os.PathLike[str] | IO[str],
    *,
    format: str = "label-studio",
    class_names: Sequence[str] | None = None,
    from_name: str = "label",
    to_name: str = "image",
) -> int:
    """Write ``items`` in one of :data:`FORMATS` to a path or text file.

    Args:
        items: the items, inputs included (they are what labellers look at).
        dest: a file path, or an open text file (left open).
        format: ``"label-studio"`` (see :func:`label_studio_task`) or ``"jsonl"`` (see
            :meth:`QueueItem.to_json`).
        class_names: names of the predicted classes, for Label Studio predictions.
        from_name: the Label Studio labelling config's control name (``<Choices name>``).
        to_name: its object name (``<Image name>``), the ``data`` key of the input.

    Returns:
        The number of items written.

    Raises:
        ValueError: an unknown format.
        FileNotFoundError: the directory of ``dest`` does not exist.
    """
    if format == "jsonl":
        return write_jsonl(items, dest)
    if format == "label-studio":
        return write_label_studio(
            items, dest, class_names=class_names, from_name=from_name, to_name=to_name
        )
    raise ValueError(f"Expected `format` to be one of {FORMATS}, but got {format!r}.")


def export_queue(
    queue: LabelQueue,
    dest: str | os.PathLike[str] | IO[str],
    *,
    format: str = "label-studio",
    status: str | None = None,
    model: str | None = None,
    limit: int | None = None,
    class_names: Sequence[str] | None = None,
    from_name: str = "label",
    to_name: str = "image",
) -> int:
    """Export a queue's items, most OOD first, as Label Studio tasks or JSON Lines.

    Reads page by page (:meth:`LabelQueue.iter_items`), so a large queue is never held in
    memory; a read-only queue is enough.

    Args:
        queue: the queue to read.
        dest: a file path, or an open text file (left open).
        format: one of :data:`FORMATS`.
        status: only items with this effective status (``"queued"``, ``"claimed"``,
            ``"done"``), or None for all.
        model: only this model's items.
        limit: at most this many items.
        class_names: names of the predicted classes (see :func:`write_items`).
        from_name: the Label Studio control name (see :func:`write_items`).
        to_name: the Label Studio object name (see :func:`write_items`).

    Returns:
        The number of items written.
    """
    if format not in FORMATS:
        raise ValueError(f"Expected `format` to be one of {FORMATS}, but got {format!r}.")
    items = queue.iter_items(status, model=model, limit=limit, include_inputs=True)
    return write_items(
        items,
        dest,
        format=format,
        class_names=class_names,
        from_name=from_name,
        to_name=to_name,
    )
