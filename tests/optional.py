"""Optional dependencies in tests: skipped where absent, required under CI.

``require("laspy")`` imports and returns the module. Where it is not installed the test is
skipped -- except under CI (``CI=true``), whose install includes every optional dependency
the suite exercises, so a missing one fails instead of quietly testing nothing.
"""

import importlib
import os

import pytest


def require(name, reason=None):
    """Import ``name`` or skip the test (fail under ``CI=true``)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        why = f"{name} is not installed ({error})" + (f": {reason}" if reason else "")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must exercise this test: {why}")
        pytest.skip(why)
