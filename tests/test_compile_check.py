"""Every kernel compiles ahead of time for sm_80 and sm_90 at the launchers' configs, with no spills."""

import importlib
import os
import subprocess
import sys

from fastppo.kernels.compile_check import KERNEL_MODULES


def test_every_kernel_module_lists_compile_specs():
    # Importing here happens under the interpreter (conftest); we only read the spec lists.
    for name in KERNEL_MODULES:
        mod = importlib.import_module(name)
        specs = getattr(mod, "COMPILE_SPECS", None)
        assert specs, f"{name} has no COMPILE_SPECS: compile_check would pass without compiling it"


def test_compile_check_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "fastppo.kernels.compile_check"], capture_output=True, text=True, env=env, timeout=900
    )
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
