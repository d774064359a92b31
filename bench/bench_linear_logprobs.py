"""Benchmark: per-token log-prob + entropy from hidden states (fused lm_head).

A thin entry point over the harness in ``fastppo.bench``:

    pytest bench/bench_linear_logprobs.py --benchmark-enable   # the device's full shapes, under pytest-benchmark
    pytest bench/bench_linear_logprobs.py                      # each benchmark once, quick shapes: a test
    python bench/bench_linear_logprobs.py [OPTIONS]            # = fastppo bench linear_logprobs [OPTIONS]
    python bench/bench_linear_logprobs.py --sweep [--H 896]    # = python -m fastppo.bench.tune_linear (CUDA)
"""

import sys

from fastppo.bench import main
from fastppo.bench.entry import run_item

OPS = ["linear_logprobs"]


def test_bench(bench_timer, one_thread, bench_item):
    run_item(bench_timer, bench_item)


if __name__ == "__main__":
    if "--sweep" in sys.argv[1:]:
        from fastppo.bench.tune_linear import main as tune

        sys.exit(tune([a for a in sys.argv[1:] if a != "--sweep"]))
    sys.exit(main([*OPS, *sys.argv[1:]]))
