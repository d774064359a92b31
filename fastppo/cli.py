"""The ``fastppo`` command line.

fastppo train [--config FILE.yaml] [--FIELD VALUE ...]  PPO on a Hugging Face model (no --model: the tiny demo)
fastppo profile [TRAIN OPTIONS]                     a few train steps under torch.profiler: trace.json, summary.md
fastppo demo [--iterations N] [--device cpu|cuda]   the tiny demo run, end to end
fastppo plot DIR [--output FILE.png]                a PNG of a run's reward, eval reward, KL, entropy, length
fastppo bench [OPS...] [--quick] [--output F.json]  microbenchmarks vs TRL/OpenRLHF/verl (fastppo bench --help)
fastppo compile-check [ARGS...]                     compile every kernel for sm_80/sm_90 (no GPU needed)
fastppo info                                        versions, device, backend
"""

from __future__ import annotations

import argparse
import sys


def _info() -> int:
    import platform

    import torch
    import transformers

    import fastppo
    from fastppo._backend import triton_available

    print(f"fastppo       {fastppo.__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__}")
    if triton_available():
        import triton

        print(f"triton        {triton.__version__}")
    else:
        print("triton        not importable (torch path only)")
    print(f"transformers  {transformers.__version__}")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU only)"
    print(f"cuda device   {dev}")
    print(f"backend       {fastppo.get_backend()}")
    print(f"kernels       {_kernel_mode()}")
    print(f"flash-attn    {_flash_attn()}")
    return 0


def _kernel_mode() -> str:
    """How the Triton kernels would run in this process (decided once, at their first import)."""
    from fastppo._backend import triton_available

    if not triton_available():
        return "unavailable (triton does not import): every op takes the PyTorch path"
    from fastppo._backend import interpreting

    if interpreting():
        return "interpreted (TRITON_INTERPRET=1): CPU tensors run the kernels under Triton's interpreter"
    import torch

    if torch.cuda.is_available():
        return "compiled for the CUDA device"
    return "compiled, but no CUDA device: CPU tensors take the PyTorch path (TRITON_INTERPRET=1 to interpret)"


def _flash_attn() -> str:
    import importlib.metadata

    from fastppo.attention import flash_attn_available

    if flash_attn_available():
        return f"{importlib.metadata.version('flash-attn')} (used on CUDA: varlen prefill, decode with KV cache)"
    return "not installed (PyTorch SDPA is used; pip install 'fastppo[flash]' adds it)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="fastppo", description="fastppo: kernel-accelerated PPO core")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="PPO training (fastppo train --help lists every option)", add_help=False)
    sub.add_parser("profile", help="a few train steps under torch.profiler (fastppo train's options)", add_help=False)
    sub.add_parser("demo", help="the default demo: a tiny PPO run, end to end", add_help=False)
    sub.add_parser("plot", help="plot a run's curves into DIR/plot.png (needs matplotlib)", add_help=False)
    sub.add_parser("bench", help="microbenchmarks (fastppo bench --help lists every option)", add_help=False)
    sub.add_parser("compile-check", help="compile every kernel ahead of time", add_help=False)
    sub.add_parser("info", help="versions, device and backend")
    args, rest = p.parse_known_args(argv)

    if args.cmd == "train":
        from fastppo.trainer.cli import main as train_main

        return train_main(rest)
    if args.cmd == "profile":
        from fastppo.trainer.profile import main as profile_main

        return profile_main(rest)
    if args.cmd == "demo":
        from fastppo.demo import main as demo_main

        return demo_main(rest)
    if args.cmd == "plot":
        from fastppo.trainer.plot import main as plot_main

        return plot_main(rest)
    if args.cmd == "compile-check":
        from fastppo.kernels.compile_check import main as cc_main

        return cc_main(rest)
    if args.cmd == "info":
        return _info()
    from fastppo.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
