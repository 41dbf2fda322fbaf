"""Receiver tests: every receiver started is killed as a group if a test leaves it running."""

from __future__ import annotations

import pytest
from receiver_helpers import start_receiver


@pytest.fixture
def receiver_factory(tmp_path):
    started = []

    def start(*extra, **kw):
        rec = start_receiver(tmp_path, *extra, **kw)
        started.append(rec)
        return rec

    yield start
    for rec in started:
        rec.kill()
