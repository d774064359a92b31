"""Shared pytest-benchmark fixtures for bench/ (``pytest bench/ --benchmark-enable``)."""

import pytest
import torch


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Without ``--benchmark-enable`` each benchmark runs once, as a test (a smoke run that cannot
    rot). Set here, before pytest-benchmark reads it, rather than in ``addopts``: an option there would
    break plain pytest wherever the plugin is not installed."""
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


@pytest.fixture
def one_thread():
    """CPU rows run on one torch thread: the Python-loop baselines gain nothing from threads, and on a
    shared machine multi-threaded ops stall whenever a sibling thread is descheduled."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
