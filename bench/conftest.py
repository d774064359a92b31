"""Shared pytest-benchmark set-up for bench/ (``pytest bench/ --benchmark-enable``).

Each ``bench_*.py`` names its ops in ``OPS`` and has one test taking ``bench_item``, parametrized
here over the harness's cases (:mod:`fastppo.bench.entry`): the device's full shapes under
``--benchmark-enable``, quick ones otherwise (each benchmark then runs once, as a test).
"""

import pytest
import torch

from fastppo.bench.entry import config, items


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Without ``--benchmark-enable`` each benchmark runs once, as a test (a smoke run that cannot
    rot). Set here, before pytest-benchmark reads it, rather than in ``addopts``: an option there would
    break plain pytest wherever the plugin is not installed."""
    if config.pluginmanager.hasplugin("benchmark") and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


def _benchmark_enabled(pytest_config) -> bool:
    return pytest_config.pluginmanager.hasplugin("benchmark") and bool(
        pytest_config.getoption("benchmark_enable", False)
    )


def pytest_generate_tests(metafunc):
    if "bench_item" in metafunc.fixturenames:
        found = items(metafunc.module.OPS, config(full=_benchmark_enabled(metafunc.config)))
        metafunc.parametrize("bench_item", found, ids=[i.id for i in found])


class _Once:
    """What the tests get without pytest-benchmark: the function is called once."""

    group = None

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


@pytest.fixture
def bench_timer(request):
    """A function giving pytest-benchmark's ``benchmark`` fixture, or :class:`_Once` where the plugin
    is not loaded (not installed, or ``-p no:benchmark``): plain ``pytest bench/`` runs either way.
    A function, so that a skipped benchmark never instantiates the plugin's fixture."""

    def get():
        if request.config.pluginmanager.hasplugin("benchmark"):
            return request.getfixturevalue("benchmark")
        return _Once()

    return get


@pytest.fixture
def one_thread():
    """CPU rows run on one torch thread: the Python-loop baselines gain nothing from threads, and on a
    shared machine multi-threaded ops stall whenever a sibling thread is descheduled."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
