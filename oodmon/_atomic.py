"""Write a file atomically: readers see the old file or the complete new one, never a part.

A command that fails half-way (a bad row, a full disk, Ctrl-C) must not replace a good file
with a truncated one. The text goes to a temporary file in the same directory (so the final
rename stays on one filesystem), is flushed to disk, and only then renamed over the target.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, TextIO, overload

__all__ = ["atomic_write"]


@overload
def atomic_write(
    path: str | os.PathLike[str], mode: Literal["w"] = "w", **open_kwargs: Any
) -> contextlib.AbstractContextManager[TextIO]: ...
@overload
def atomic_write(
    path: str | os.PathLike[str], mode: Literal["wb"], **open_kwargs: Any
) -> contextlib.AbstractContextManager[BinaryIO]: ...
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any
) -> contextlib.AbstractContextManager[IO[Any]]:
    """Open a temporary file for writing and move it onto ``path`` when the block succeeds.

    Args:
        path: the file to create or replace.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        open_kwargs: passed to :func:`open` (``newline=""``, ``encoding=...``).

    Returns:
        A context manager whose ``with`` block gets the open temporary file (``TextIO`` for
        ``"w"``, ``BinaryIO`` for ``"wb"``). On success it is flushed, fsynced and renamed onto
        ``path`` (the file gets the usual permissions, as ``open`` would give it); if the block
        raises, the temporary file is removed and ``path`` is left as it was.

    Raises:
        ValueError: a mode other than ``"w"`` or ``"wb"`` (at the call).
        FileNotFoundError: (on entering the block) the directory of ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f'Expected `mode` to be "w" or "wb", but got {mode!r}.')
    return _atomic_write(Path(path), mode, open_kwargs)


@contextlib.contextmanager
def _atomic_write(target: Path, mode: str, open_kwargs: dict[str, Any]) -> Iterator[IO[Any]]:
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Cannot write {target}: the directory {directory} does not exist; create it first "
            "or choose another path."
        )
    if target.is_dir():
        raise IsADirectoryError(f"Cannot write {target}: it is a directory; give a file path.")
    tmp = directory / f".{target.name}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: never follow or reuse an existing file; 0o666 lets the umask decide, as open() does
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, mode, **open_kwargs) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
