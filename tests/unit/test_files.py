"""Native stderr (what C++ writes to fd 2) during a backend's start goes to the log, not the
terminal; with the terminal handler at INFO (`-v`) it shows there too."""

import logging
import os

from omni_export.files import native_chatter


def test_native_stderr_goes_to_the_log_and_the_fd_comes_back(capfd, caplog):
    with caplog.at_level(logging.INFO, logger="omni_export.native"), native_chatter("a backend"):
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "cpuinfo" not in err and "after" in err  # fd 2 restored
    assert any("a backend" in r.message and "cpuinfo_utils" in r.message for r in caplog.records)
