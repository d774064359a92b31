"""fastppo's microbenchmarks: ``fastppo bench [OPS...]`` (``python -m fastppo.bench``).

The harness lives in the package so that it runs from a wheel install; ``bench/bench_*.py`` in the
repository are thin pytest-benchmark entry points over it. Modules: :mod:`~fastppo.bench.timing`
(the one timing method), :mod:`~fastppo.bench.peaks` (the device's peaks, same run),
:mod:`~fastppo.bench.baselines` (TRL, OpenRLHF and verl code, labelled), the ``ops_*`` modules (the
cases), :mod:`~fastppo.bench.runner` (rows), :mod:`~fastppo.bench.report` (markdown, PNG) and
:mod:`~fastppo.bench.command` (the command line).
"""


def main(argv=None) -> int:
    """``fastppo bench`` with ``argv`` (default: ``sys.argv[1:]``)."""
    from fastppo.bench.command import main as _main

    return _main(argv)
