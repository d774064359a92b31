"""The ``fastppo`` command line.

fastppo train [--config FILE.yaml] [--FIELD VALUE ...]  PPO on a Hugging Face model (no --model: the tiny demo)
fastppo demo [--iterations N] [--device cpu|cuda]   the tiny demo run, end to end
fastppo bench NAME [ARGS...]                        run bench/bench_NAME.py
                                                    (gae, losses, logprobs, linear_logprobs, generate)
fastppo compile-check [ARGS...]                     compile every kernel for sm_80/sm_90 (no GPU needed)
fastppo info                                        versions, device, backend
"""

from __future__ import annotations

import argparse
import pathlib
import runpy
import sys


def _bench_dir() -> pathlib.Path:
    # The benchmarks live beside the package in a source checkout (they are not installed).
    return pathlib.Path(__file__).resolve().parents[1] / "bench"


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
    sub.add_parser("demo", help="the default demo: a tiny PPO run, end to end", add_help=False)
    b = sub.add_parser("bench", help="run one benchmark script from bench/")
    b.add_argument("name")
    sub.add_parser("compile-check", help="compile every kernel ahead of time", add_help=False)
    sub.add_parser("info", help="versions, device and backend")
    args, rest = p.parse_known_args(argv)

    if args.cmd == "train":
        from fastppo.trainer.cli import main as train_main

        return train_main(rest)
    if args.cmd == "demo":
        from fastppo.demo import main as demo_main

        return demo_main(rest)
    if args.cmd == "compile-check":
        from fastppo.kernels.compile_check import main as cc_main

        return cc_main(rest)
    if args.cmd == "info":
        return _info()
    # bench
    script = _bench_dir() / f"bench_{args.name}.py"
    if not script.exists():
        names = (
            sorted(s.stem[len("bench_") :] for s in _bench_dir().glob("bench_*.py")) if _bench_dir().exists() else []
        )
        raise SystemExit(
            f"fastppo bench: no benchmark named {args.name!r}; "
            f"available: {names or 'none (run from a source checkout)'}"
        )
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
