"""The end-to-end PPO step benchmark (fastppo.bench.ops_e2e): its rows' schema at a tiny shape, TRL's
rows skipped with the reason where trl is missing, and (where trl==1.12.0 is installed) TRL's trainer
stepped one loop iteration at a time, with and without its gc.collect() calls."""

import importlib.metadata
import json

import pytest
import torch

from fastppo.bench import ops_e2e, trl_ppo
from fastppo.bench.cases import BenchConfig
from fastppo.bench.runner import add_speedups, plan, resolve_ops, run_case

QUICK = BenchConfig(device="cpu", quick=True, compile=False)
ROW_KEYS = {
    "op", "impl", "pass", "shape", "dtype", "device", "source", "baseline", "time_ms", "reps", "peak_mem_mb",
    "work", "achieved", "unit", "peak", "fraction_of_peak", "speedup", "max_abs_diff",
}  # fmt: skip


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_trl(monkeypatch):
    """As where trl is not installed (CI), whatever this environment has."""
    real = importlib.metadata.version

    def version(name):
        if name == "trl":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(trl_ppo.importlib.metadata, "version", version)


def _rows(cfg=QUICK):
    (_, cases), *_ = plan(["ppo_step"], cfg)
    assert [run_case(c, None, {}) for c in cases] == [[]]  # nothing for the runner's timer: the session times it
    rows = ops_e2e.ppo_step_rows(cases, [], {})
    add_speedups(rows)
    return rows


def test_ppo_step_is_an_op():
    assert resolve_ops(["ppo_step"]) == ["ppo_step"]
    assert "ppo_step" in resolve_ops(["all"])


def test_fastppo_row_has_the_schema_and_trl_rows_say_why_they_are_skipped(no_trl, one_thread):
    rows = _rows()
    s = ops_e2e.SETUPS["quick"]
    by = {(r["op"], r["impl"]): r for r in rows}
    ours = by[("ppo_step", "fastppo")]
    for r in rows:
        assert r.keys() >= ROW_KEYS, ROW_KEYS - r.keys()
        assert r["pass"] == "step" and r["device"] == "cpu" and r["shape"] == s.shape == "B=4 P=8 N=8"
    assert not ours.get("error") and not ours["baseline"]
    assert ours["time_ms"] > 0 and ours["unit"] == "tok/s" and ours["reps"] == s.rounds
    assert ours["work"] == s.prompts * s.new
    assert ours["achieved"] == pytest.approx(ours["work"] / (ours["time_ms"] * 1e-3))
    assert set(ours["phases_ms"]) == set(ops_e2e.ALL_PHASES) and ours["phases_ms"]["gc"] == 0
    assert len(ours["load_avg"]) == 2 and ours["gc_objects"] > 0
    for phase in ops_e2e.PHASES:
        row = by[(f"ppo_step:{phase}", "fastppo")]
        assert 0 < row["time_ms"] < ours["time_ms"]
        assert row["time_ms"] == pytest.approx(ours["phases_ms"][phase])
    for impl in ("trl-1.12.0", "trl-1.12.0-no-gc"):
        for op in ("ppo_step", *(f"ppo_step:{p}" for p in ops_e2e.PHASES)):
            r = by[(op, impl)]
            assert r["baseline"] and r["time_ms"] is None and "trl not installed" in r["skipped"], r
            assert "pip install trl==1.12.0" in r["skipped"]
    assert ours["speedup"] == {}  # no timed baseline
    json.dumps(rows)


def test_unavailable_names_the_wrong_version(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(trl_ppo.importlib.metadata, "version", lambda n: "1.13.0" if n == "trl" else real(n))
    assert "trl 1.13.0 installed" in trl_ppo.unavailable()


def test_char_tokenizer_round_trips_every_id():
    tok = ops_e2e.char_tokenizer(256)
    assert len(tok) == 256 and tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.padding_side == "left"
    ids = list(range(4, 256))
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_both_sides_get_the_same_models():
    s = ops_e2e.SETUPS["quick"]
    a, b = ops_e2e.make_models(s, "cpu"), ops_e2e.make_models(s, "cpu")
    for name in ("policy", "ref", "reward", "value"):
        for (k, x), (_, y) in zip(a[name].state_dict().items(), b[name].state_dict().items()):
            assert torch.equal(x, y), (name, k)
    assert torch.equal(a["value"].score.weight, a["reward"].score.weight)
    assert a["policy"].config.model_type == "llama" and a["reward"].config.num_labels == 1


def test_trl_steps_one_loop_iteration_at_a_time(one_thread):
    """Runs TRL 1.12.0's PPOTrainer (skipped where it is not installed, as in CI)."""
    pytest.importorskip("trl")
    pytest.importorskip("accelerate")
    if trl_ppo.unavailable() is not None:
        pytest.skip(trl_ppo.unavailable())
    s = ops_e2e.SETUPS["quick"]
    with ops_e2e.steppers(s, "cpu") as steps:
        assert list(steps) == ["fastppo", "trl-1.12.0", "trl-1.12.0-no-gc"]
        for name in steps:
            steps[name]()  # the first TRL step includes train()'s set-up
        gc_step, plain = steps["trl-1.12.0"](), steps["trl-1.12.0-no-gc"]()
        ours = steps["fastppo"]()
    for st in (gc_step, plain, ours):
        parts = sum(st[p] for p in ops_e2e.ALL_PHASES)
        assert parts == pytest.approx(st["step"], rel=1e-6)
        assert all(st[p] > 0 for p in ("generation", "scoring", "update")), st
    assert gc_step["gc"] > 0 and plain["gc"] == 0
    assert 0 < gc_step["ref"] + gc_step["values"] < gc_step["prepare"]


def test_trl_rows_are_timed_where_trl_is_installed(one_thread):
    pytest.importorskip("trl")
    if trl_ppo.unavailable() is not None:
        pytest.skip(trl_ppo.unavailable())
    rows = _rows()
    main = {r["impl"]: r for r in rows if r["op"] == "ppo_step"}
    assert set(main) == {"fastppo", "trl-1.12.0", "trl-1.12.0-no-gc"}
    for r in main.values():
        assert r["time_ms"] > 0 and not r.get("error") and not r.get("skipped"), r
    assert set(main["fastppo"]["speedup"]) == {"trl-1.12.0", "trl-1.12.0-no-gc"}
    assert main["trl-1.12.0"]["phases_ms"]["gc"] > 0 and main["trl-1.12.0-no-gc"]["phases_ms"]["gc"] == 0
