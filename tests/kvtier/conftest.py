"""Fixtures of the KV tier tests."""

from __future__ import annotations

import pytest
from kvtier_helpers import fingerprint

from tusk.kvformat import ModelFingerprint


@pytest.fixture
def fp() -> ModelFingerprint:
    return fingerprint()
