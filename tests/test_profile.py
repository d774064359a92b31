"""``fastppo profile``: the trace, the summary of the phases and kernels, and its one-line errors."""

import json

import pytest

from fastppo.cli import main
from fastppo.trainer.phases import PHASES
from fastppo.trainer.profile_summary import RunFacts, markdown, summarize

SUBPHASES = PHASES[1:]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One small profile of the demo (gae: every phase runs), shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("profile")
    argv = ["profile", "--output-dir", str(out), "--max-steps", "2", "--rollout-batch-size", "8", "--ppo-epochs", "1"]
    assert main([*argv, "--advantage", "gae"]) == 0
    return out


def test_trace_is_a_chrome_trace_with_the_phase_ranges(profiled):
    with open(profiled / "trace.json") as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name") for e in events if e.get("cat") == "user_annotation"}
    assert set(PHASES) <= names
    assert {"fastppo.policy_loss", "fastppo.gae", "fastppo.value_loss"} <= names


def test_summary_has_every_phase_and_shares_that_sum_to_the_step(profiled):
    s = json.loads((profiled / "summary.json").read_text())
    assert list(s["phases"]) == list(PHASES)
    assert all(p["ran"] for p in s["phases"].values())
    assert s["phases"]["step"]["share"] == pytest.approx(1.0)
    shares = [s["phases"][p]["share"] for p in SUBPHASES]
    assert all(0 < x < 1 for x in shares)
    assert sum(shares) + s["other"]["share"] == pytest.approx(1.0, abs=1e-9)
    assert s["other"]["share"] > -1e-6  # the named phases never add up to more than the step
    assert s["profiled_steps"] == 1 and s["tokens"]["generated"] > 0 and s["tokens"]["per_s"] > 0
    assert s["phases"]["update_actor"]["peak_mem_mib"] is not None
    assert s["host_syncs"]["decode_steps"] > 0 and s["host_syncs"]["per_decode_step"] is not None
    assert s["mfu"]["peak_tflops"] > 0 and s["mfu"]["mfu"] > 0
    md = (profiled / "summary.md").read_text()
    assert all(f"| {p} |" in md for p in PHASES) and "MFU" in md


def test_top_kernels_mark_fastppos_ops(profiled):
    s = json.loads((profiled / "summary.json").read_text())
    assert s["top_kernels"] and all("fastppo" in k for k in s["top_kernels"])
    ours = s["top_fastppo_kernels"]
    assert ours and all(k["fastppo"].startswith("fastppo.") or k["fastppo"].endswith("Backward") for k in ours)
    assert {"fastppo.policy_loss", "fastppo.value_loss", "fastppo.gae"} <= set(s["fastppo_ops"])
    assert 0 < s["fastppo_share"] < 1
    assert sum(k["share"] for k in s["top_kernels"]) <= 1 + 1e-9


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--max-stepz", "3"], "did you mean --max-steps?"),
        (["--kl-coef", "-1"], "kl_coef"),
        (["--max-steps", "1"], "at least 2"),
    ],
)
def test_a_bad_option_fails_in_one_line_before_any_model_loads(argv, expected, monkeypatch, capsys):
    import fastppo.tiny

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(fastppo.tiny, "tiny_qwen2", no_model)
    try:
        code = main(["profile", *argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastppo profile: error:") and expected in err[0], err


def _x(cat, name, ts, dur, pid=1, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _mem(ts, mib):
    args = {"Total Allocated": mib * 2**20, "Device Type": 1, "Device Id": 0, "Bytes": 0}
    return {"ph": "i", "cat": "cpu_instant_event", "name": "[memory]", "pid": 1, "tid": 1, "ts": ts, "args": args}


def test_summary_of_a_cuda_trace():
    """Kernels found through their launch's correlation id; fastppo's marked by the range around the launch or
    by the backward of a fastppo autograd function on the autograd thread; syncs counted in gen only."""
    back = "LinearLogprobsEntropyTritonBackward"
    events = [
        _x("user_annotation", "step", 0, 1000),
        _x("user_annotation", "gen", 0, 300),
        _x("cuda_runtime", "cudaLaunchKernel", 100, 5, correlation=2),
        _x("cuda_runtime", "cudaStreamSynchronize", 200, 10),
        _x("user_annotation", "update_actor", 400, 500),
        _x("user_annotation", "fastppo.policy_loss", 450, 50),
        _x("cuda_runtime", "cudaLaunchKernel", 460, 10, correlation=1),
        _x("cpu_op", f"autograd::engine::evaluate_function: {back}", 600, 100, tid=2),
        _x("cuda_driver", "cuLaunchKernel", 610, 10, tid=2, correlation=3),
        _x("cuda_runtime", "cudaStreamSynchronize", 950, 10),  # in the step, not in gen
        _x("cuda_runtime", "cudaLaunchKernel", 1990, 5, correlation=4),  # after the step: not counted
        _x("kernel", "_policy_loss_fwd", 470, 20, pid=0, tid=7, correlation=1),
        _x("kernel", "sm90_gemm", 105, 80, pid=0, tid=7, correlation=2),
        _x("kernel", "_lp_bwd", 620, 100, pid=0, tid=7, correlation=3),
        _x("kernel", "late", 2000, 10, pid=0, tid=7, correlation=4),
        _mem(50, 100),
        _mem(450, 300),
        _mem(950, 200),
        _mem(1500, 900),
    ]
    facts = RunFacts(
        device="cuda",
        steps=1,
        generated_tokens=32,
        prompt_tokens=32,
        decode_steps=4,
        flops={"gen": 3e9},
        peak_tflops=100.0,
        peak_name="matmul_bf16_tflops",
        not_run={"values": "no critic"},
        fastppo_backward=frozenset({back}),
    )
    s = summarize({"traceEvents": events}, facts)
    ph = s["phases"]
    assert ph["gen"]["share"] == pytest.approx(0.3) and ph["update_actor"]["share"] == pytest.approx(0.5)
    assert s["other"]["share"] == pytest.approx(0.2)
    assert ph["gen"]["kernel_ms"] == pytest.approx(0.08) and ph["update_actor"]["kernel_ms"] == pytest.approx(0.12)
    assert s["kernel_ms"] == pytest.approx(0.2)
    rows = {k["name"]: k for k in s["top_kernels"]}
    assert set(rows) == {"_policy_loss_fwd", "sm90_gemm", "_lp_bwd"}
    assert rows["_policy_loss_fwd"]["fastppo"] == "fastppo.policy_loss"
    assert rows["_lp_bwd"]["fastppo"] == back and rows["sm90_gemm"]["fastppo"] is None
    assert s["fastppo_share"] == pytest.approx(0.6)
    assert s["host_syncs"]["count"] == 1 and s["host_syncs"]["per_decode_step"] == pytest.approx(0.25)
    assert ph["gen"]["peak_mem_mib"] == pytest.approx(100) and ph["update_actor"]["peak_mem_mib"] == pytest.approx(300)
    assert ph["step"]["peak_mem_mib"] == pytest.approx(300)
    assert ph["gen"]["tflops"] == pytest.approx(10.0) and ph["gen"]["mfu"] == pytest.approx(0.1)
    assert ph["values"] == {"ran": False, "note": "no critic"}
    assert ph["ref"]["ran"] is False and ph["ref"]["note"]
    md = markdown(s)
    assert "| values | - | - | - | - | - | did not run: no critic |" in md


def test_profile_refuses_torchrun(monkeypatch, capsys):
    from fastppo.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["profile"]) == 2
    assert "not under torchrun" in capsys.readouterr().err


def test_reused_rollout_logprobs_make_old_log_prob_a_phase_that_did_not_run():
    """With reuse_rollout_logprobs no policy forward recomputes the old log-probs: no FLOPs are put on
    that phase, and the summary says why it did not run."""
    from types import SimpleNamespace

    from fastppo.tiny import tiny_qwen2
    from fastppo.trainer import PPOConfig
    from fastppo.trainer.profile import _not_run, model_flops

    policy = tiny_qwen2(96)
    for reuse, kept in ((False, False), (True, False), (False, True), (True, True)):
        config = PPOConfig.from_dict(dict(reuse_rollout_logprobs=reuse, advantage="grpo", samples_per_prompt=2))
        trainer = SimpleNamespace(
            config=config, policy=policy, reward=None, reference=None, critic=None, keep_first_forward=kept
        )
        flops, why = model_flops(trainer, 100, 1, 1), _not_run(trainer, 1)
        assert ("old_log_prob" in flops) is not reuse
        assert ("old_log_prob" in why) is reuse
        # a kept forward (keep_first_forward) is old_log_prob's: the update has only the backward left
        assert flops["update_actor"] == (2 if kept and not reuse else 3) * flops["gen"] > 0
