"""Native stderr (what C++ writes to fd 2) during a backend's start goes to the log, not the
terminal; with the terminal handler at INFO (`-v`) it shows there too. Staged writes: unique
temporaries, nothing left on failure, the old folder kept until the new one is in place, and
what killed runs left swept."""

import logging
import os

import pytest

from omni_export.files import native_chatter


def test_native_stderr_goes_to_the_log_and_the_fd_comes_back(capfd, caplog):
    with caplog.at_level(logging.INFO, logger="omni_export.native"), native_chatter("a backend"):
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "cpuinfo" not in err and "after" in err  # fd 2 restored
    assert any("a backend" in r.message and "cpuinfo_utils" in r.message for r in caplog.records)


def test_staged_writes_use_unique_names_and_leave_nothing_on_failure(tmp_path):
    from omni_export.files import _stage_name, atomic_write_text, staged_dir, staged_file

    out = tmp_path / "x.json"
    assert _stage_name(out, ".tmp") != _stage_name(out, ".tmp")  # two writers never share a temporary
    with pytest.raises(RuntimeError), staged_file(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(out, "whole")
    with staged_dir(tmp_path / "b") as a, staged_dir(tmp_path / "b") as b:
        assert a != b and a.name.startswith(".b.") and a.name.endswith(".partial")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"] and out.read_text() == "whole"


def test_replace_dir_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path):
    from omni_export.files import replace_dir

    final, new = tmp_path / "bundle", tmp_path / "new"
    final.mkdir(), new.mkdir()
    (final / "old.txt").write_text("old")
    (new / "new.txt").write_text("new")
    replace_dir(new, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_what_a_killed_run_left_is_swept_and_a_live_run_s_is_not(tmp_path):
    import os
    import subprocess

    from omni_export.files import sweep_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    final = tmp_path / "bundle"
    stale = tmp_path / f".bundle.{dead.pid}-00000000.partial"
    live = tmp_path / f".bundle.{os.getpid()}-00000000.partial"
    other = tmp_path / ".bundle.notes"
    for p in (stale, live, other):
        p.mkdir()
    assert sweep_stale(final) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_torch_logs_are_routed_when_torch_is_imported_not_at_cli_start(tmp_path):
    """The CLI's logging set-up does not import torch (1.4 s that `profiles` does not need); when
    torch is imported later, its loggers lose their own stderr handlers and propagate to ours
    (all but its structured trace, torch.__trace, which stays torch's)."""
    import subprocess
    import sys

    code = (
        "import sys, logging\n"
        "from omni_export import cli\n"
        "cli._logging(False)\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "own = [n for n, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger)\n"
        "       and n.split('.')[0] == 'torch' and n != 'torch.__trace'\n"
        "       and (not l.propagate or any(type(h) is logging.StreamHandler for h in l.handlers))]\n"
        "assert not own, own\n"
        "assert not logging.getLogger('torch.__trace').propagate\n"
        "assert logging.getLogger('torch').propagate\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OMNI_EXPORT_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
