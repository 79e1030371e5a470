"""One writer per output, and the temporaries of killed runs cleaned by the next run.

Names this module uses beside an output ``NAME``, in the same folder:

``.NAME.polyprune-lock``
    lock file, ``flock``-ed for the whole run by the process writing ``NAME`` (its pid inside).
    The kernel drops the lock when that process dies, however it dies.
``.NAME.tmp-HOST-PID-XXXXXXXX``
    the folder (or file) being written by process PID on HOST, renamed to ``NAME`` when done
    (:mod:`polyprune.outputs`).
``.NAME.old-HOST-PID-XXXXXXXX``
    the replaced output while ``--overwrite`` swaps the new one in.

A run that writes into a folder first removes the ``.tmp-``/``.old-`` entries there whose
process is gone (same host only: on a shared filesystem another node's pids mean nothing here).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from polyprune.errors import InputError

__all__ = ["HOST", "current_umask", "output_lock", "remove_stale", "temp_prefix"]

logger = logging.getLogger(__name__)

# No '-' in the host part, so that a name splits unambiguously into host, pid and random part.
HOST = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"
_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[a-z0-9_]+$"
)
_LOCK_RE = re.compile(r"^\..+\.polyprune-lock$")  # ours only: never another tool's lock


def current_umask() -> int:
    """The process umask (reading it means setting it: put straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """Start of the name of a temporary beside output ``name``: ours, this host, this pid."""
    return f".{name}.{kind}-{HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


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
    if m["host"] != HOST or _pid_alive(int(m["pid"])):
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
    os.write(fd, f"{os.getpid()} {HOST}\n".encode())
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
