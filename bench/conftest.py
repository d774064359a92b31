"""Shared pytest-benchmark fixtures for bench/ (``pytest bench/ --benchmark-enable``)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """CPU rows run on one torch thread: the Python-loop baselines gain nothing from threads, and on a
    shared machine multi-threaded ops stall whenever a sibling thread is descheduled."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
