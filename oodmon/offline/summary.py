"""What one offline scoring run did, whichever engine ran it (local or Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ScoreSummary"]


@dataclass(frozen=True)
class ScoreSummary:
    """What a run did.

    Attributes:
        rows: verdict rows written (valid and invalid).
        flagged: rows flagged OOD (``p_value <= alpha``, or the BH cut with ``fdr``).
        invalid: rows that could not be scored; ``invalid_reasons`` counts them per reason.
        skipped: JSON Lines records that carry no outputs (request events), not rows
            (None with Ray, which does not count them).
        alpha: the false-alarm rate used (None when ``fdr`` chose the flags).
        fdr: the false discovery rate, if Benjamini-Hochberg chose the flags.
        p_cutoff: the BH cut: flagged iff ``p_value <= p_cutoff`` (None without ``fdr``).
        destination: where the verdicts went (None: a stream).
        engine: ``"local"`` or ``"ray"``.
        seconds: wall time of the run.
    """

    rows: int
    flagged: int
    invalid: int
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    skipped: int | None = 0
    alpha: float | None = None
    fdr: float | None = None
    p_cutoff: float | None = None
    destination: str | None = None
    engine: str = "local"
    seconds: float = 0.0
