"""Fixtures of the site tests (helpers in site_helpers.py)."""

from pathlib import Path

import pytest
from site_helpers import require_site


@pytest.fixture(scope="session")
def site() -> Path:
    """The built site; the test fails (not skips) when there is none."""
    return require_site()
