"""Fixtures shared by several test modules."""
from __future__ import annotations

import uuid

import pytest

from pipeline.shm import cleanup_segments, segment_prefix


@pytest.fixture
def node():
    """A unique node name; every segment it left in /dev/shm is removed afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    cleanup_segments(segment_prefix(name))
