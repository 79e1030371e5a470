"""Output safety: one writer per output, staged writes renamed into place, temporaries of killed
runs cleaned by the next run, and a full or read-only disk reported in one line.

Names this module uses beside an output ``NAME``, in the same folder:

``.NAME.polyprune-lock``
    lock file, ``flock``-ed for the whole run by the process writing ``NAME`` (its pid inside).
    The kernel drops the lock when that process dies, however it dies.
``.NAME.tmp-HOST-PID-XXXXXXXX``
    the folder (or file) being written by process PID on HOST, renamed to ``NAME`` when done.
``.NAME.old-HOST-PID-XXXXXXXX``
    the replaced output while ``--overwrite`` swaps the new one in.
``NAME.kept-PID``
    a finished run's output when ``NAME`` appeared meanwhile (another tool, a run without the
    lock): never replaced silently, never cleaned as stale.

A run that writes into a folder first removes the ``.tmp-``/``.old-`` entries there whose
process is gone (same host only: on a shared filesystem another node's pids mean nothing here).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from polyprune.errors import InputError

__all__ = [
    "current_umask",
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

# No '-' in the host part, so that a name splits unambiguously into host, pid and random part.
_HOST = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"
_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[a-z0-9_]+$"
)
_LOCK_RE = re.compile(r"^\..+\.polyprune-lock$")  # ours only: never another tool's lock
# A write that fails for lack of room or of a writable disk: reported in one line, not a trace.
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)
_OS_ERROR_RE = re.compile(r"os error (\d+)")  # how Rust (safetensors, tokenizers) reports errno


class OutputWriteError(InputError, OSError):
    """An output could not be written (disk full, file too large, read-only): one line, exit 2.
    Also an OSError, so code that tolerates failed optional writes (the cache) still does."""


def current_umask() -> int:
    """The process umask (reading it means setting it: put straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 directories; an output should get what ``mkdir`` would give it."""
    path.chmod(0o777 & ~current_umask())


def _temp_prefix(name: str, kind: str = "tmp") -> str:
    return f".{name}.{kind}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


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


def remove_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove temporaries in ``parent`` left by killed processes of this host; returns them.
    An ``.old-`` output whose replacement never arrived (killed between the two renames of an
    overwrite) is put back instead."""
    parent = Path(parent)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None:
            if _LOCK_RE.match(entry.name):
                _remove_lock_if_free(Path(entry.path))
            continue
        if not _is_stale(entry, m):
            continue
        path, target = Path(entry.path), parent / m["name"]
        try:
            if m["kind"] == "old" and not os.path.lexists(target):
                path.rename(target)
                logger.warning("restored %s, left aside by killed process %s", target, m["pid"])
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:
            logger.warning("could not remove %s left by killed process %s: %s", path, m["pid"], e)
            continue
        logger.warning("removed %s, left by killed process %s", path, m["pid"])
        removed.append(path)
    return removed


def _is_stale(entry: os.DirEntry, m: re.Match) -> bool:
    """Left by a dead process. The pid alone is not enough where containers share a hostname
    but not a pid namespace: a staging folder also needs its output's lock to be free (a live
    writer holds it), and a file (never locked) must be a minute old."""
    if m["host"] != _HOST or _pid_alive(int(m["pid"])):
        return False
    lock = Path(entry.path).parent.resolve() / f".{m['name']}.polyprune-lock"
    if lock not in _held and _lock_busy(lock):  # held by this process: no one else writes it
        return False
    try:
        return entry.is_dir(follow_symlinks=False) or time.time() - entry.stat().st_mtime > 60
    except OSError:
        return False


# --- the lock ------------------------------------------------------------------------------

_held: dict[Path, list[int]] = {}  # lock file -> [fd, depth]: reentrant within a process
_held_guard = threading.Lock()


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.polyprune-lock"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _remove_lock_if_free(path: Path) -> None:
    """Unlink a lock file nobody holds (its writer was killed). Safe: a process that locked the
    old file sees it is no longer at ``path`` and locks the new one."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock_busy(path: Path) -> bool:
    """Whether some process holds the lock file ``path`` (tested by taking it for an instant;
    ``_acquire`` retries briefly, so such a test never turns a real run away)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the lock just taken
    return False


def _holder(fd: int) -> str:
    """The pid written by the lock's holder (it may be a moment behind taking the lock)."""
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode(errors="replace").split()
        if text:
            return text[0]
        time.sleep(0.05)
    return "unknown"


def _ensure_parent(out: Path) -> list[Path]:
    """Create ``out``'s missing ancestors; returns those it created, deepest first."""
    created = [p for p in out.parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the folder of output {out}: {e.strerror}") from e
    return created


def _remove_if_empty(dirs: list[Path]) -> None:
    """Folders made for an output that was never written (a refused or failed run): a run
    refused for ``--out MODEL/sub/x`` must not leave ``MODEL/sub`` behind."""
    for d in dirs:  # deepest first; a folder that holds anything now stays
        try:
            d.rmdir()
        except OSError:
            return


def _flock_soon(fd: int) -> None:
    """Lock, retrying for a moment: cleanups and stale checks hold locks for an instant."""
    for _ in range(10):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.02)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _acquire(lock: Path, out: Path) -> int | None:
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as e:
            raise InputError(f"cannot write to {out.parent}: {e.strerror}") from e
        try:
            _flock_soon(fd)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise InputError(
                f"{out} is being written by process {pid}; wait for it or choose another output"
            ) from None
        except OSError as e:  # a filesystem without locks: go on, unprotected
            os.close(fd)
            logger.warning("cannot lock %s (%s); concurrent runs are not detected", lock, e)
            return None
        if _same_file(fd, lock):
            break
        os.close(fd)  # removed by its previous holder meanwhile: lock the file there now
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {_HOST}\n".encode())
    return fd


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``.NAME.polyprune-lock`` beside ``out`` for the block: a second writer of ``out``
    (another process) fails at once with InputError naming the holder's pid. Reentrant in a
    process."""
    out = Path(out).resolve()
    created = _ensure_parent(out)
    lock = _lock_path(out)
    with _held_guard:
        if lock in _held:
            _held[lock][1] += 1
        else:
            try:
                fd = _acquire(lock, out)
            except BaseException:
                _remove_if_empty(created)
                raise
            _held[lock] = [fd, 1]
    try:
        yield out
    finally:
        with _held_guard:
            entry = _held[lock]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[lock]
                fd = entry[0]
                if fd is not None:
                    with contextlib.suppress(OSError):
                        if _same_file(fd, lock):
                            lock.unlink()  # while still locked: see _remove_lock_if_free
                    os.close(fd)
                _remove_if_empty(created)


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
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix("polyprune-probe"), dir=probe_in)
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
            old = out.parent / f"{_temp_prefix(out.name, 'old')}{secrets.token_hex(4)}"
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
        prefix, tmp = _temp_prefix(out.name), None
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
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
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
