"""The pytest-benchmark side of the harness: ``bench/bench_*.py`` parametrize one test over
:func:`items` and run each with :func:`run_item` (``pytest bench/ --benchmark-enable``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastppo.bench.cases import BenchConfig, Case, Impl
from fastppo.bench.runner import passes_of, plan, resolve_ops
from fastppo.bench.timing import sync


@dataclass(frozen=True)
class Item:
    """One benchmark of pytest: an implementation of a case, in one pass."""

    case: Case
    impl: Impl
    pass_: str

    @property
    def id(self) -> str:
        c = self.case
        return "-".join([c.op, c.shape.replace(" ", "_"), c.dtype, self.pass_, self.impl.name])


def config(*, full: bool) -> BenchConfig:
    """The device's full shapes with compilation under ``--benchmark-enable``; else quick ones, so that
    plain ``pytest bench/`` runs every benchmark once, as a test, in seconds."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return BenchConfig(device=device, quick=not full, compile=full)


def items(ops: list[str], cfg: BenchConfig) -> list[Item]:
    return [
        Item(case, impl, p)
        for _, cases in plan(resolve_ops(ops), cfg)
        for case in cases
        for impl in case.impls
        for p in passes_of(case, impl)
    ]


def run_item(get_benchmark, item: Item) -> None:
    """Warm up (compile, capture) outside the timing, then hand the call to the benchmark fixture
    that ``get_benchmark()`` gives (pytest-benchmark's, fetched only once the item is not skipped)."""
    import pytest

    if item.impl.skip is not None:
        pytest.skip(item.impl.skip)
    benchmark = get_benchmark()
    case, device = item.case, item.case.device
    try:
        fn = case.call(item.impl, item.pass_)
        fn()
        benchmark.group = f"{case.op} {case.shape} {case.dtype} {item.pass_} {device}"
        benchmark(lambda: (fn(), sync(device)))
    finally:
        case.release()
