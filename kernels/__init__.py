"""Triton kernels of fastppo, installed as ``fastppo.kernels``.

This file stays free of side effects (no kernel imports, no environment changes): import the op
modules (``fastppo.kernels.policy_loss`` ...) explicitly. Never ``import kernels``: Hugging Face ships
a top-level package of that name, and transformers probes for it.
"""
