"""ExecuTorch's process-wide backend options, set through the runtime's own C++ call."""

import pytest

from omni_export.runtime_py.backends import et_options
from omni_export.runtime_py.backends.base import BackendUnavailableError

pytest.importorskip("executorch.runtime", reason="the ExecuTorch runtime is not installed")

XNN, CACHE = "XnnpackBackend", "weight_cache_enabled"


@pytest.fixture
def restore_cache():
    before = et_options.get_option(XNN, CACHE)
    yield
    et_options.set_option(XNN, CACHE, before)


def test_an_option_set_is_the_option_read_back(restore_cache):
    for value in (True, False, True):
        et_options.set_option(XNN, CACHE, value)
        assert et_options.get_option(XNN, CACHE) is value
    assert et_options.apply({f"{XNN}.{CACHE}": "false"}) == {f"{XNN}.{CACHE}": False}
    assert et_options.get_option(XNN, CACHE) is False


def test_options_the_runtime_does_not_take_are_refused_not_assumed(restore_cache):
    with pytest.raises(BackendUnavailableError, match="read back"):  # XNNPACK ignores keys it does not know
        et_options.set_option(XNN, "no_such_option", True)
    with pytest.raises(BackendUnavailableError, match="refused"):
        et_options.set_option("NoSuchBackend", CACHE, True)
    with pytest.raises(BackendUnavailableError, match="Backend.key"):
        et_options.apply({CACHE: "true"})


def test_option_text_is_typed_as_the_runtime_takes_it():
    assert et_options.parse("true") is True and et_options.parse(" False ") is False
    assert et_options.parse("3") == 3 and et_options.parse("/data/cache.bin") == "/data/cache.bin"
