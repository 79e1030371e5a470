"""Output safety under faults: concurrent runs on one output, killed runs, an output inside the
model, read-only and full disks. CLI cases run as real subprocesses on the demo model."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyprune.errors import InputError
from polyprune.locks import HOST
from polyprune.outputs import (
    check_not_source,
    output_lock,
    remove_stale,
    staged_output,
    write_file_atomic,
)

CLI = [sys.executable, "-m", "polyprune.cli"]


def prune_args(out, method="wanda", nsamples=4, *extra):
    return ["prune", "--model", "demo", "--method", method, "--calib", "en", "--nsamples",
            str(nsamples), "--seqlen", "64", "--out", str(out), "-q", *extra]  # fmt: skip


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          **kw)  # fmt: skip


def start(args) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0):
    """Poll ``pred`` until it returns something true, failing if ``proc`` ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) first: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("timed out")


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in stderr, stderr
    return lines[-1]


# --- 1. two runs on one output -------------------------------------------------------------


def test_second_run_on_the_same_out_fails_fast_and_the_first_finishes(tmp_path):
    out = tmp_path / "X"
    lock = tmp_path / ".X.polyprune-lock"
    first = start(prune_args(out, "wanda", 4))
    holder = str(first.pid)
    wait_for(lambda: lock.exists() and lock.read_text().split()[:1] == [holder], first)
    os.kill(first.pid, signal.SIGSTOP)  # the first run stays mid-run while the second starts
    try:
        second = run(prune_args(out, "sparsegpt"))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert error_line(second.stderr) == (
        f"polyprune prune: error: {out} is being written by process {holder}; "
        "wait for it or choose another output"
    )
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert json.loads((out / "polyprune.json").read_text())["method"] == "wanda"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # lock file removed


def _hold_lock(out: str, ready, release) -> None:
    with output_lock(out):
        ready.set()
        release.wait(60)


def test_api_run_refused_while_another_process_holds_the_lock(tmp_path, tiny_model_dir):
    import polyprune

    out = tmp_path / "X"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(InputError, match=f"being written by process {holder.pid}"):
            polyprune.prune(tiny_model_dir(), method="magnitude", out=out)
    finally:
        release.set()
        holder.join(60)
    polyprune.prune(tiny_model_dir(), method="magnitude", out=out)  # released at its exit
    assert (out / "polyprune.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".X")) == []


def test_lock_is_released_when_the_api_run_fails(tmp_path):
    import polyprune

    out = tmp_path / "X"
    with pytest.raises(InputError):
        polyprune.prune("demo", method="wanda", calib="xx", out=out)
    with output_lock(out):  # would raise if the failed run had kept it
        pass
    assert list(tmp_path.iterdir()) == []


def test_output_that_appears_meanwhile_is_kept_and_this_run_saved_beside_it(tmp_path):
    out = tmp_path / "X"
    with pytest.raises(InputError) as err, staged_output(out, overwrite=False) as tmp:
        (tmp / "mine").write_text("new")
        out.mkdir()  # another tool (or a run without the lock) wrote X meanwhile
        (out / "theirs").write_text("old")
    kept = tmp_path / f"X.kept-{os.getpid()}"
    assert str(err.value) == (
        f"{out} appeared while this run was writing it and was left as it is; this run's "
        f"output is in {kept} (use --overwrite to replace)"
    )
    assert (out / "theirs").read_text() == "old"
    assert (kept / "mine").read_text() == "new"
    remove_stale(tmp_path)  # the kept output is not a temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", kept.name]


def test_output_that_appears_meanwhile_is_replaced_with_overwrite(tmp_path):
    out = tmp_path / "X"
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "mine").write_text("new")
        out.mkdir()
        (out / "theirs").write_text("old")
    assert [p.name for p in out.iterdir()] == ["mine"]
    assert [p.name for p in tmp_path.iterdir()] == ["X"]


def test_file_that_appears_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    path = tmp_path / "r.json"

    def write(tmp):
        Path(tmp).write_text("new")
        path.write_text("old")

    with pytest.raises(InputError, match="appeared while this run was writing it"):
        write_file_atomic(path, write, overwrite=False)
    assert path.read_text() == "old"
    assert (tmp_path / f"r.json.kept-{os.getpid()}").read_text() == "new"


# --- 2. killed runs ------------------------------------------------------------------------


def _temp(folder: Path):
    return next(iter(folder.glob(".X.tmp-*")), None)


def test_sigterm_mid_run_exits_143_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "X"
    proc = start(prune_args(out, "wanda", 32))
    wait_for(lambda: _temp(tmp_path), proc)  # streaming: written as it runs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert (
        proc.stderr.read()
        .strip()
        .endswith("polyprune: terminated; outputs are written only when complete")
    )
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    out = tmp_path / "X"
    proc = start(prune_args(out, "wanda", 32))
    left = wait_for(lambda: _temp(tmp_path), proc)
    proc.kill()
    proc.wait(timeout=60)
    assert left.exists()  # nothing can clean up after SIGKILL ...
    assert f"-{proc.pid}-" in left.name  # ... so the temporary names its owner
    again = run(prune_args(out, "magnitude"))  # ... but the next run into the folder does
    assert again.returncode == 0, again.stderr
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]


def test_stale_temporaries_of_live_processes_and_other_hosts_are_kept(tmp_path):
    mine = tmp_path / f".X.tmp-{HOST}-{os.getpid()}-abc"
    other_host = tmp_path / ".X.tmp-otherhost-999999999-abc"
    unrelated = tmp_path / ".X.tmp-abc123"  # not ours to judge
    for p in (mine, other_host, unrelated):
        p.mkdir()
    remove_stale(tmp_path)
    assert all(p.exists() for p in (other_host, unrelated))


def test_output_set_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = tmp_path / f".X.old-{HOST}-{dead.pid}-abcd1234"  # killed between the two renames
    old.mkdir()
    (old / "theirs").write_text("old")
    remove_stale(tmp_path)
    assert (tmp_path / "X" / "theirs").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["X"]


def test_temporary_of_a_dead_pid_is_kept_while_its_output_is_locked(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    # a writer in another pid namespace with the same hostname: its pid means nothing here
    tmp = tmp_path / f".X.tmp-{HOST}-{dead.pid}-abcd1234"
    tmp.mkdir()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "X"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        remove_stale(tmp_path)
        assert tmp.exists()
    finally:
        release.set()
        holder.join(60)
    assert remove_stale(tmp_path) == [tmp]


# --- 3. output inside the model -------------------------------------------------------------


def test_out_that_is_the_model_directory_through_a_symlink_is_refused(tmp_path, tiny_model_dir):
    model = Path(tiny_model_dir())
    before = sorted(p.name for p in model.iterdir())
    link = tmp_path / "link"
    link.symlink_to(model)
    res = run(["prune", "--model", model, "--method", "magnitude", "--out", link, "--overwrite"])
    assert res.returncode == 2
    assert error_line(res.stderr) == (
        f"polyprune prune: error: output {str(link)!r} is the model directory itself; "
        "choose another"
    )
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize(
    "rel, says", [("sub/out", "is inside the model directory"), ("..", "contains the model")]
)
def test_out_inside_or_around_the_model_is_refused(tmp_path, rel, says):
    model = tmp_path / "m"
    model.mkdir()
    with pytest.raises(InputError, match=says):
        check_not_source(model / rel, [model])


# --- 4. read-only and full disks ------------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write into, even root (a read-only tmpfs mount where root may mount;
    else /sys, read-only or refusing new entries on any Linux)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
    ).returncode == 0  # fmt: skip
    if not mounted:
        yield Path("/sys/polyprune-test")
        return
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def matrix_config(path: Path, workdir: Path) -> Path:
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    path.write_text(demo.read_text().replace("workdir: runs/matrix-demo", f"workdir: {workdir}"))
    return path


@pytest.mark.parametrize("command", ["prune", "eval", "analyze", "matrix"])
def test_read_only_output_fails_before_any_work(tmp_path, read_only_dir, command):
    out = read_only_dir / ("r.json" if command == "eval" else "X")
    analyze = ["analyze", "--dense", "demo", "--compressed", "demo", "--langs", "en"]
    args = {
        "prune": prune_args(out),
        "eval": ["eval", "--model", "demo", "--langs", "en", "--out", out, "-q"],
        "analyze": [*analyze, "--out", out, "-q"],
        "matrix": ["matrix", matrix_config(tmp_path / "m.yaml", out), "-q"],
    }[command]
    res = run(args)
    assert res.returncode == 2
    line = error_line(res.stderr)
    assert line.startswith(f"polyprune {command}: error: cannot ")
    assert any(
        why in line for why in ("Read-only file system", "Permission denied", "not permitted")
    )
    assert "%|" not in res.stderr  # no progress bar: refused before the work


def _file_size_limit(limit: int):
    def preexec():  # SIGXFSZ: CPython ignores it at startup, so the write gets EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_full_disk_during_the_write_is_one_line_exit_2_and_nothing_left(tmp_path):
    out = tmp_path / "X"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    res = run(prune_args(out), preexec_fn=_file_size_limit(2 << 20), env=env)  # model: 14 MiB
    assert res.returncode == 2, res.stderr
    assert error_line(res.stderr) == (
        f"polyprune prune: error: cannot write {out}: File too large; nothing was written"
    )
    assert list(tmp_path.iterdir()) == []


def test_write_failure_of_a_single_file_is_reported_and_leaves_nothing(tmp_path):
    path = tmp_path / "r.json"

    def full(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match="No space left on device; nothing was written"):
        write_file_atomic(path, full)
    assert list(tmp_path.iterdir()) == []


# --- 5. eval --out naming a directory -------------------------------------------------------


def test_eval_out_naming_a_directory_is_refused(tmp_path):
    res = run(["eval", "--model", "demo", "--langs", "en", "--out", tmp_path, "--overwrite"])
    assert res.returncode == 2
    assert error_line(res.stderr) == (
        f"polyprune eval: error: output {str(tmp_path)!r} is a directory; give a file name"
    )


def test_another_tools_lock_file_beside_an_output_is_left_alone(tmp_path):
    """Stale-lock cleanup removes only polyprune's own lock files: a tool whose lock is the
    existence of ``.NAME.lock`` must not lose it because polyprune wrote into the folder."""
    from polyprune.outputs import write_file_atomic

    theirs = tmp_path / ".build.lock"
    theirs.write_text("not ours\n")
    write_file_atomic(tmp_path / "a.json", lambda p: Path(p).write_text("{}\n"))
    assert theirs.is_file()


def test_refused_out_inside_the_model_leaves_no_folder_behind(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    before = sorted(p.name for p in model.iterdir())
    r = run(["prune", "--model", model, "--method", "magnitude", "--out", model / "sub" / "x"])
    assert r.returncode == 2 and "is inside the model directory" in r.stderr
    assert sorted(p.name for p in model.iterdir()) == before  # no empty "sub" left in it


def test_folders_made_for_an_output_stay_when_it_is_written(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output_lock(out):
        out.mkdir()
    assert out.is_dir()
    with output_lock(tmp_path / "c" / "d" / "out"):
        pass  # nothing written: the folders made for it go again
    assert not (tmp_path / "c").exists()
