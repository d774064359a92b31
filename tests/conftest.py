"""Test configuration: kernels run under Triton's interpreter on CPU tensors unless a GPU is present."""

import os

# Must be set before fastppo.kernels is imported: Triton picks compiled vs interpreted at decoration.
if not os.environ.get("FASTPPO_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's deprecation warning

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
