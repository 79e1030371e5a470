"""Outputs appear whole or not at all, and with the permissions mkdir/open would give them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from polyprune.outputs import staged_output, write_file_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_file_atomic_gives_open_permissions(tmp_path, umask_022):
    path = write_file_atomic(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
    assert path.read_text() == "{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_file_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]  # no temporary file left


def test_staged_output_gives_mkdir_permissions_and_replaces_only_when_done(tmp_path, umask_022):
    out = tmp_path / "run"
    with staged_output(out, overwrite=False) as tmp:
        (tmp / "x").write_text("1")
        assert not out.exists()  # nothing at the final name before the block ends
    assert (out / "x").read_text() == "1"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700

    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("killed")
    assert (out / "x").read_text() == "1"  # the old output survives a failed run
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("stream", [True, False])
def test_every_file_of_a_pruned_output_gets_open_permissions(tmp_path, umask_022, stream):
    """The in-memory path used to leave model.safetensors and masks.safetensors at mkstemp's
    0600: unreadable to the rest of a group sharing a results folder."""
    import polyprune

    out = tmp_path / "out"
    polyprune.prune("demo", "wanda", 0.5, calib="en", nsamples=2, seqlen=32, out=out,
                    stream=stream, save_masks=True, progress=False)  # fmt: skip
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
