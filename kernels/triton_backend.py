"""The `triton` backend's registrations; the kernels themselves load lazily (importing triton is slow)."""

from __future__ import annotations


def register_all() -> None:
    """Filled in as Triton kernels land; until then dispatch uses the torch backend everywhere."""
