"""Hypothesis profiles for the property tests (tests/test_properties.py).

- `ci` (the default, and what CI runs): derandomized, so every run draws the same
  examples and a failure reproduces; 200 examples per property and format.
- `long`: 5000 fresh random examples per property and format, for a run by hand
  (docs/determinism.md):  HYPOTHESIS_PROFILE=long python3 -m pytest tests/test_properties.py
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings

# `pyimg build` uses the user's build cache by default (docs/cache.md): the CLI runs of
# the tests get one of their own, never the home directory's.  (Not through
# XDG_CACHE_HOME: the kernels and the Debian root are cached there between runs.)
os.environ["PYIMG_BUILD_CACHE"] = _BUILD_CACHE = tempfile.mkdtemp(prefix="pyimg-test-build-cache-")
atexit.register(shutil.rmtree, _BUILD_CACHE, ignore_errors=True)

# A build is ~5-50 ms and an example runs several: per-example deadlines and the
# "too slow" health check would only report the machine's load, never a bug.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

settings.register_profile("ci", derandomize=True, max_examples=200, database=None, print_blob=True, **_COMMON)
settings.register_profile("long", max_examples=5000, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def no_image_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds that never reuse a whole image (pyimg/reuse.py): for the tests of what
    the stat, content and scan caches do on a rebuild, which a reused image skips."""
    import pyimg.reuse

    monkeypatch.setattr(pyimg.reuse.Reuse, "for_build", classmethod(lambda cls, options, tree: None))
