"""Benchmark: the PPO policy loss, value loss and KL penalty.

A thin entry point over the harness in ``fastppo.bench``:

    pytest bench/bench_losses.py --benchmark-enable   # the device's full shapes, under pytest-benchmark
    pytest bench/bench_losses.py                      # each benchmark once, quick shapes: a test
    python bench/bench_losses.py [OPTIONS]            # = fastppo bench losses [OPTIONS]
"""

import sys

from fastppo.bench import main
from fastppo.bench.entry import run_item

OPS = ["policy_loss", "value_loss", "kl"]


def test_bench(bench_timer, one_thread, bench_item):
    run_item(bench_timer, bench_item)


if __name__ == "__main__":
    sys.exit(main([*OPS, *sys.argv[1:]]))
