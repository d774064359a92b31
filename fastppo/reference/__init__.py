"""Pure-PyTorch reference implementations of every fastppo op.

They are the CPU path, the ground truth of the tests and the baselines of the benchmarks. Each op
lives in the module of its family (``losses``, ``advantages``, ``logprobs``); ``common`` holds the
masked reductions they share.
"""
