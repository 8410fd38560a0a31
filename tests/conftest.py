"""Shared fixtures. The real photos live beside the checkout in ../shared/white-dogs (never committed)."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WHITE_DOGS = (REPO_ROOT / ".." / "shared" / "white-dogs").resolve()


@pytest.fixture(scope="session")
def white_dogs() -> Path:
    """The shared photo folder; its absence is a failure (CI always has it), not a skip."""
    assert WHITE_DOGS.is_dir(), f"expected the shared photos at {WHITE_DOGS}"
    return WHITE_DOGS
