"""Benchmark: per-token log-prob + entropy from logits.

A thin entry point over the harness in ``fastppo.bench``:

    pytest bench/bench_logprobs.py --benchmark-enable   # the device's full shapes, under pytest-benchmark
    pytest bench/bench_logprobs.py                      # each benchmark once, quick shapes: a test
    python bench/bench_logprobs.py [OPTIONS]            # = fastppo bench logprobs [OPTIONS]
"""

import sys

from fastppo.bench import main
from fastppo.bench.entry import run_item

OPS = ["logprobs"]


def test_bench(bench_timer, one_thread, bench_item):
    run_item(bench_timer, bench_item)


if __name__ == "__main__":
    sys.exit(main([*OPS, *sys.argv[1:]]))
