"""``score_table``: score a table of logged model outputs with a Detector, streaming.

The one entry point for offline scoring: the ``oodmon score`` command and the tests call it,
and ``engine="ray"`` hands the same work to Ray Data (:mod:`oodmon.offline.ray_engine`),
whose workers call the same :func:`~oodmon.offline.scoring.score_batch`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from oodmon.detector import Detector
from oodmon.errors import NotFittedError
from oodmon.offline._pipeline import BackgroundConsumer, prefetch
from oodmon.offline.fdr import bh_cutoff, p_value_counts
from oodmon.offline.readers import TableReader, open_reader
from oodmon.offline.scoring import VERDICT_COLUMNS, score_batch
from oodmon.offline.summary import ScoreSummary
from oodmon.offline.writers import open_writer
from oodmon.offline.writers import output_format as resolve_output_format

__all__ = ["ENGINES", "as_names", "load_detector", "score_table"]

ENGINES = ("local", "ray")


def score_table(
    source: str | os.PathLike[str] | Any,
    detector: Detector | str | os.PathLike[str],
    destination: str | os.PathLike[str] | TextIO | None = None,
    *,
    columns: str | Sequence[str] | None = None,
    keep: str | Sequence[str] = (),
    key: str | None = None,
    input_format: str | None = None,
    output_format: str | None = None,
    batch_rows: int | None = None,
    alpha: float | None = None,
    fdr: float | None = None,
    progress: bool = True,
    engine: str = "local",
    ray_address: str | None = None,
    concurrency: int | None = None,
) -> ScoreSummary:
    """Score every row of a table of model outputs and write one verdict per row.

    Memory stays flat in the table's size: rows stream through in batches of ``batch_rows``.

    Args:
        source: a Parquet, JSON Lines, ``.npy`` or ``.pt`` file (or a directory of files of
            one format), or an in-memory ``[N, K]`` array or tensor.
        detector: a fitted Detector, or the path of its JSON.
        destination: a ``.parquet``, ``.jsonl`` or ``.csv`` path (written to a temporary
            file, renamed on success), a text stream, or None for stdout (CSV/JSONL). With
            ``engine="ray"``: a directory of Parquet files.
        columns: which columns hold the outputs: a list column's name, K numeric column
            names (``"a,b,c"`` or a sequence), or ``"prefix*"``; for JSON Lines, the OIP
            output tensor's name. Default: the table's only list column / only tensor.
        keep: input columns to copy into the output (``"id,timestamp"``), e.g. to join back.
        key: for a ``.pt`` file holding a dict, the entry to score.
        input_format: ``parquet``, ``jsonl``, ``npy`` or ``pt`` (default: from the suffix).
        output_format: ``parquet``, ``jsonl`` or ``csv`` (default: from the suffix, else CSV).
        batch_rows: rows per batch (default: about 16 MiB of outputs).
        alpha: override the detector's false-alarm rate.
        fdr: flag by Benjamini-Hochberg at this false discovery rate over the WHOLE table
            instead of ``p_value <= alpha``. It reads and scores the input twice (the first
            pass counts rows per p-value level: n_calibration + 1 integers, not a value per
            row); with Ray, that is two Ray jobs.
        progress: a tqdm bar with rows/s on stderr when it is a terminal (Ray: Ray's bars).
        engine: ``"local"`` (this process) or ``"ray"`` (Ray Data; ``pip install oodmon[ray]``).
        ray_address: the Ray cluster to join (default: start a local one).
        concurrency: Ray scoring workers (default: as many as the cluster's CPUs allow).

    Returns:
        A :class:`ScoreSummary`.

    Raises:
        UnreadableInputError: the input cannot be read at all (a missing or corrupt file, a
            missing column, a width other than the detector's).
        ValueError: bad arguments.
    """
    started = time.perf_counter()
    model = load_detector(detector)
    if alpha is not None:
        model = model.with_alpha(alpha)
    chosen = as_names(columns)
    kept = as_names(keep)
    _check_keep(kept)
    if engine not in ENGINES:
        raise ValueError(f"Expected `engine` in {ENGINES}, but got {engine!r}.")
    if batch_rows is not None and batch_rows < 1:
        raise ValueError(f"Expected `batch_rows` to be a positive integer, but got {batch_rows}.")
    if engine == "ray":
        from oodmon.offline.ray_engine import score_with_ray

        return score_with_ray(
            source, model, destination, columns=chosen, keep=kept, input_format=input_format,
            batch_rows=batch_rows, fdr=fdr, progress=progress, address=ray_address,
            concurrency=concurrency, started=started,
        )  # fmt: skip
    if concurrency is not None or ray_address is not None:
        raise ValueError("Expected `concurrency` and `ray_address` only with engine='ray'.")
    reader = open_reader(
        source, model.num_outputs, columns=chosen, keep=kept, key=key,
        batch_rows=batch_rows, fmt=input_format,
    )  # fmt: skip
    target = sys.stdout if destination is None else destination
    fmt = resolve_output_format(target, output_format)
    cutoff = None
    if fdr is not None:
        cutoff = _bh_pass(reader, model, fdr, progress)
    flagged = written = 0
    reasons: dict[str, int] = {}
    with (
        open_writer(target, fmt, kept, index=True) as writer,
        _progress(reader.total_rows, "scoring", progress) as bar,
    ):
        # read, score and write overlap (three threads, two batches of slack between them)
        background: BackgroundConsumer[tuple[Any, int]] = BackgroundConsumer(
            lambda item: writer.write(*item)
        )
        try:
            for rows in prefetch(reader):
                scored = score_batch(model, rows, cutoff)
                background.put((scored, written))
                written += len(scored)
                flagged += int(scored.verdict.flag.sum())
                for reason, count in scored.reason_counts().items():
                    reasons[reason] = reasons.get(reason, 0) + count
                if bar is not None:
                    bar.update(len(scored))
        finally:
            background.close()
    return ScoreSummary(
        rows=writer.rows,
        flagged=flagged,
        invalid=sum(reasons.values()),
        invalid_reasons=reasons,
        skipped=reader.skipped,
        alpha=None if fdr is not None else model.alpha,
        fdr=fdr,
        p_cutoff=cutoff,
        destination=None if not isinstance(target, (str, os.PathLike)) else str(target),
        engine="local",
        seconds=time.perf_counter() - started,
    )


def _bh_pass(reader: TableReader, detector: Detector, fdr: float, progress: bool) -> float:
    """First pass of ``fdr``: count rows per p-value level, return the BH cut."""
    bh_cutoff(np.zeros(1, np.int64), 0, fdr)  # validate fdr before reading anything
    counts = np.zeros(detector.n_calibration_ + 1, dtype=np.int64)
    with _progress(reader.total_rows, "p-values (pass 1 of 2)", progress) as bar:
        for rows in prefetch(reader):
            p_value = score_batch(detector, rows).verdict.p_value
            counts += p_value_counts(p_value, detector.n_calibration_)
            if bar is not None:
                bar.update(len(rows))
    return bh_cutoff(counts, detector.n_calibration_, fdr)


def load_detector(detector: Detector | str | os.PathLike[str]) -> Detector:
    """A fitted Detector, or one loaded from its JSON."""
    if isinstance(detector, Detector):
        if not detector.is_fitted:
            raise NotFittedError(
                "This Detector is not fitted yet: call `fit(id_outputs)` or "
                "`Detector.load(path)` before `score_table`."
            )
        return detector
    file = Path(detector)
    if not file.is_file():
        raise FileNotFoundError(f"detector file not found: {file}")
    return Detector.load(file)


def as_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")``; None or "" -> ``()``."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)


def _check_keep(keep: tuple[str, ...]) -> None:
    taken = [name for name in keep if name in ("index", *VERDICT_COLUMNS)]
    if taken:
        raise ValueError(
            f"Expected --keep columns whose names differ from the verdict's, but got "
            f"{', '.join(taken)}; rename them in the input first."
        )


@contextlib.contextmanager
def _progress(total: int | None, desc: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar with rows/s on stderr, or None.

    None when disabled, when stderr is not a terminal (logs stay clean) or when tqdm is not
    installed (``pip install oodmon[offline]``).
    """
    if not enabled:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, not a dependency
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="rows", unit_scale=True, file=sys.stderr,
               disable=None, dynamic_ncols=True)  # fmt: skip
    try:
        yield bar
    finally:
        bar.close()
