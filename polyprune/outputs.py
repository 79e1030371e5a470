"""Output safety: staged writes renamed into place, checks of an output before any work, and a
full or read-only disk reported in one line. The lock that keeps one writer per output and the
cleanup of killed runs' temporaries are in :mod:`polyprune.locks`.

Names this module uses beside an output ``NAME``, in the same folder (the others:
:mod:`polyprune.locks`):

``.NAME.tmp-HOST-PID-XXXXXXXX``
    the folder (or file) being written by process PID on HOST, renamed to ``NAME`` when done.
``NAME.kept-PID``
    a finished run's output when ``NAME`` appeared meanwhile (another tool, a run without the
    lock): never replaced silently, never cleaned as stale.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from polyprune.errors import InputError
from polyprune.locks import current_umask, output_lock, remove_stale, temp_prefix

__all__ = [
    "current_umask",  # from polyprune.locks, like output_lock and remove_stale
    "OutputWriteError",
    "check_output_dir",
    "check_output_file",
    "check_not_source",
    "check_writable",
    "output_lock",
    "remove_stale",
    "staged_output",
    "write_failure",
    "write_file_atomic",
]

logger = logging.getLogger(__name__)

# A write that fails for lack of room or of a writable disk: reported in one line, not a trace.
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)
_OS_ERROR_RE = re.compile(r"os error (\d+)")  # how Rust (safetensors, tokenizers) reports errno


class OutputWriteError(InputError, OSError):
    """An output could not be written (disk full, file too large, read-only): one line, exit 2.
    Also an OSError, so code that tolerates failed optional writes (the cache) still does."""


def chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 directories; an output should get what ``mkdir`` would give it."""
    path.chmod(0o777 & ~current_umask())


def write_failure(exc: BaseException) -> str | None:
    """The reason (``No space left on device``...) when ``exc`` is a write that failed for lack
    of room or of a writable disk, looking through wrapped errors; None otherwise."""
    texts = {os.strerror(n): n for n in _FULL}
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return os.strerror(exc.errno)
        text = str(exc)
        for code in _OS_ERROR_RE.findall(text):
            if int(code) in _FULL:
                return os.strerror(int(code))
        for t in texts:
            if t in text:
                return t
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _raise_if_write_failure(exc: BaseException, out: Path) -> None:
    reason = write_failure(exc)
    if reason is not None:
        raise OutputWriteError(f"cannot write {out}: {reason}; nothing was written") from exc


# --- checks before any work ----------------------------------------------------------------


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output unless ``overwrite``; call before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output directory {str(out)!r} exists and is not empty; use --overwrite")
    return out


def check_output_file(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a file output that is a directory, or exists without ``overwrite``."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"output {str(out)!r} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise InputError(f"output {str(out)!r} exists; use --overwrite")
    return out


def check_not_source(
    out: str | os.PathLike, sources: Iterable[str | os.PathLike], inside_ok: bool = False
) -> None:
    """Refuse an output that is, contains, or (unless ``inside_ok``) is inside an input
    directory, symlinks resolved: writing it would replace, delete or add to the input."""
    target = Path(out).resolve()
    for src in sources:
        src = Path(src).resolve()
        if target == src:
            raise InputError(f"output {str(out)!r} is the model directory itself; choose another")
        if target.is_relative_to(src) and not inside_ok:
            raise InputError(f"output {str(out)!r} is inside the model directory {str(src)!r}")
        if src.is_relative_to(target):
            raise InputError(f"output {str(out)!r} contains the model directory {str(src)!r}")


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove a small file in ``folder`` (or its nearest existing ancestor): the
    only sure test, since ``os.access`` says yes to root on a read-only filesystem."""
    folder = Path(folder).resolve()
    probe_in = folder
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix("polyprune-probe"), dir=probe_in)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"cannot write to {folder}: {e.strerror}") from e


# --- writing -------------------------------------------------------------------------------


def _kept_name(out: Path) -> Path:
    kept = out.with_name(f"{out.name}.kept-{os.getpid()}")
    n = 1
    while os.path.lexists(kept):
        kept, n = out.with_name(f"{out.name}.kept-{os.getpid()}-{n}"), n + 1
    return kept


def _refuse_appeared(out: Path, tmp: Path) -> None:
    kept = _kept_name(out)
    tmp.rename(kept)
    raise InputError(
        f"{out} appeared while this run was writing it and was left as it is; this run's "
        f"output is in {kept} (use --overwrite to replace)"
    )


def _put_in_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an ``out`` that appeared meanwhile is replaced
    only with ``overwrite`` (an empty folder is replaced by the rename itself)."""
    if os.path.lexists(out):
        occupied = not out.is_dir() or out.is_symlink() or any(out.iterdir())
        if occupied and (not overwrite or not out.is_dir() or out.is_symlink()):
            _refuse_appeared(out, tmp)
        if occupied:
            old = out.parent / f"{temp_prefix(out.name, 'old')}{secrets.token_hex(4)}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:  # Ctrl-C or SIGTERM between the renames: undo the first
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
    tmp.rename(out)


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write into, under ``out``'s lock; renamed to
    ``out`` when the block ends without an exception, removed otherwise."""
    with output_lock(out) as out:
        check_output_dir(out, overwrite)
        remove_stale(out.parent)
        prefix, tmp = temp_prefix(out.name), None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
            chmod_like_mkdir(tmp)
            yield tmp
            _put_in_place(tmp, out, overwrite)
        except BaseException as e:
            # By name, not by ``tmp``: a signal may land between mkdtemp and the assignment.
            for own in out.parent.glob(glob.escape(prefix) + "*"):
                shutil.rmtree(own, ignore_errors=True)
            if tmp is None and isinstance(e, OSError):
                raise OutputWriteError(f"cannot write to {out.parent}: {e.strerror}") from e
            _raise_if_write_failure(e, out)
            raise
    logger.info("wrote %s", out)


def write_file_atomic(
    path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = True
) -> Path:
    """``write(tmp)`` writes a temporary file beside ``path``, which is then renamed onto
    ``path`` with the mode ``open`` would give it (mkstemp makes 0600 files); on any error the
    temporary file is removed and ``path`` is left as it was. Without ``overwrite``, a ``path``
    that appeared meanwhile is kept and the new file is left beside it as ``NAME.kept-PID``."""
    path = Path(path)
    remove_stale(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    except OSError as e:
        raise OutputWriteError(f"cannot write to {path.parent}: {e.strerror}") from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(Path(tmp), path)
    except BaseException as e:
        _raise_if_write_failure(e, path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _link_new(tmp: Path, path: Path) -> None:
    """Create ``path`` from ``tmp`` only if nothing is there: a hard link fails if it exists."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        _refuse_appeared(path, tmp)
    except OSError:  # no hard links on this filesystem: check, then rename
        if os.path.lexists(path):
            _refuse_appeared(path, tmp)
        os.replace(tmp, path)
