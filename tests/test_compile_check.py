"""Every kernel compiles ahead of time for sm_80 and sm_90 at the launchers' configs, with no spills."""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

from fastppo.kernels.compile_check import kernel_modules, package_modules, uncompiled


def test_every_kernel_module_lists_compile_specs():
    # Importing here happens under the interpreter (conftest); we only read the spec lists.
    names = kernel_modules()
    ops = ("policy_loss", "value_loss", "kl", "gae", "logprobs", "linear_logprobs")
    assert {f"fastppo.kernels.{op}" for op in ops} <= set(names), names
    for name in names:
        mod = importlib.import_module(name)
        specs = getattr(mod, "COMPILE_SPECS", None)
        assert specs, f"{name} has no COMPILE_SPECS: compile_check would pass without compiling it"


def test_every_jitted_function_is_compiled():
    # A kernel (in any module of the package) missing from every COMPILE_SPECS would never be
    # compiled ahead of time; device functions count as compiled through the kernels that call them.
    assert uncompiled(package_modules()) == []


def test_uncompiled_finds_a_forgotten_kernel(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(
        "from fastppo.kernels._jit import CompileSpec, jit\n"
        "from fastppo.kernels import _lse\n\n"
        "@jit\ndef _helper(x):\n    return x\n\n"
        "@jit\ndef _kernel(X):\n    _lse.online_lse_finish(_helper(X), X, X)\n\n"
        "@jit\ndef _forgotten_kernel(X):\n    _helper(X)\n\n"
        "COMPILE_SPECS = [CompileSpec(_kernel, {}, {})]\n"
    )
    spec = importlib.util.spec_from_file_location("fastppo.kernels._probe", src)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    lse = importlib.import_module("fastppo.kernels._lse")
    # _helper and online_lse_finish are reached through _kernel, by name and as a module attribute.
    assert uncompiled([probe, lse]) == [
        "fastppo.kernels._probe._forgotten_kernel",
        "fastppo.kernels._lse.online_lse_step",
    ]
    assert uncompiled([probe]) == ["fastppo.kernels._probe._forgotten_kernel"]
    assert uncompiled([lse]) == ["fastppo.kernels._lse.online_lse_step", "fastppo.kernels._lse.online_lse_finish"]


def _compile_check(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastppo.kernels.compile_check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_only_matching_nothing_names_the_kernels():
    out = _compile_check("--only", "no_such_kernel", timeout=300)
    assert out.returncode == 1
    assert "'no_such_kernel' matches no kernel" in out.stderr
    assert "_gae_kernel" in out.stderr and "_linear_dz_kernel" in out.stderr, out.stderr


def test_compile_check_reports_progress():
    out = _compile_check("--only", "_linear_lse_combine_kernel", "--arch", "80", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compile_check: 2 compiles" in out.stderr
    assert "compile_check: 1/2 done, 0 failed" in out.stderr and "compile_check: 2/2 done, 0 failed" in out.stderr
    assert "2 compiled, 0 failed" in out.stdout


@pytest.mark.slow
def test_compile_check_passes():
    out = _compile_check()
    print(out.stdout[-4000:], out.stderr[-4000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert " 0 failed, spilled or lost vector loads / tensor cores" in out.stdout


def test_sass_summary_reads_load_width_and_matrix_instructions():
    from fastppo.kernels.compile_check import sass_summary

    sass = """
        /*0100*/                   LDG.E.U16 R4, desc[UR6][R2.64] ;
        /*0110*/              @!P0 LDG.E.64 R6, desc[UR6][R8.64] ;
        /*0120*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R10.64] ;
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
    """
    assert sass_summary(sass) == {"load_bits": 128, "mma": "HGMMA"}
    assert sass_summary("LDG.E.U16 R4, [R2.64] ;\nHMMA.16816.F32.BF16 R0, R4, R8, R0 ;") == {
        "load_bits": 16,
        "mma": "HMMA",
    }
    assert sass_summary("LDG.E R4, [R2.64] ;\nFFMA R0, R1, R2, R0 ;") == {"load_bits": 32, "mma": "-"}


def test_verdict_flags_spills_narrow_loads_and_missing_tensor_cores():
    from fastppo.kernels._jit import CompileSpec
    from fastppo.kernels.compile_check import verdict

    spec = CompileSpec(kernel=None, signature={}, constexprs={}, min_load_bits=128, tensor_cores=True)
    good = {"local": 0, "stack": 0, "shared": 98304, "load_bits": 128, "mma": "HGMMA"}
    assert verdict(spec, good) == "ok"
    assert "SPILL" in verdict(spec, dict(good, stack=8))
    assert "NARROW LOADS" in verdict(spec, dict(good, load_bits=16))
    assert "NO TENSOR CORES" in verdict(spec, dict(good, mma="-"))
    big = dict(good, shared=192 * 1024)  # fits an H100 block, not an A100 one
    assert verdict(spec, dict(big, shared=100), 80) == "ok"
    assert "SHARED" in verdict(spec, big, 80) and verdict(spec, big, 90) == "ok"
    assert verdict(CompileSpec(kernel=None, signature={}, constexprs={}), dict(good, load_bits=16, mma="-")) == "ok"


def test_hot_kernels_are_checked_in_their_run_time_specialization():
    # The log-prob kernels' speed rests on 16-byte loads of aligned rows, the linear kernels' on
    # tensor cores: each must have specs that compile_check holds to that.
    from fastppo.kernels import linear_logprobs, logprobs

    lp = [s for s in logprobs.COMPILE_SPECS if s.divisible is not None]
    assert lp and all(s.min_load_bits >= 64 for s in lp)
    assert any(s.min_load_bits == 128 and "bf16 BLOCK_V=4096" in s.label for s in lp)
    lin16 = [s for s in linear_logprobs.COMPILE_SPECS if "al=1" in s.label and not s.label.startswith("fp32")]
    assert lin16 and all(s.tensor_cores and s.divisible and s.min_load_bits == 128 for s in lin16)
