"""Benchmark: the end-to-end PPO step, fastppo.PPOTrainer vs TRL 1.12.0's PPOTrainer (when installed).

A thin entry point over the harness in ``fastppo.bench``:

    pytest bench/bench_e2e.py --benchmark-enable   # the device's full shape, one step per call, under pytest-benchmark
    pytest bench/bench_e2e.py                      # each implementation's step once, quick shape: a test
    python bench/bench_e2e.py [OPTIONS]            # = fastppo bench ppo_step [OPTIONS]: interleaved, with phases

pytest-benchmark times each implementation's steps one after the other; the figures that compare them
come from ``fastppo bench ppo_step``, which interleaves their steps (fastppo.bench.ops_e2e).
"""

import sys

import pytest

from fastppo.bench import main, ops_e2e, trl_ppo
from fastppo.bench.entry import config

OPS = ["ppo_step"]


@pytest.mark.parametrize("impl", [ops_e2e.FASTPPO, ops_e2e.TRL, ops_e2e.TRL_NO_GC])
def test_bench(bench_timer, one_thread, request, impl):
    trl = impl != ops_e2e.FASTPPO
    if trl and trl_ppo.unavailable() is not None:
        pytest.skip(trl_ppo.unavailable())
    pc = request.config
    full = pc.pluginmanager.hasplugin("benchmark") and bool(pc.getoption("benchmark_enable", False))
    cfg = config(full=full)
    s = ops_e2e.setup_of(cfg)
    benchmark = bench_timer()
    with ops_e2e.steppers(s, cfg.device, trl=trl) as steps:
        for _ in range(s.warmup):
            steps[impl]()
        benchmark.group = f"{ops_e2e.OP} {s.shape} {cfg.device}"
        benchmark(steps[impl])


if __name__ == "__main__":
    sys.exit(main([*OPS, *sys.argv[1:]]))
