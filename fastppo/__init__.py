"""fastppo: a kernel-accelerated PPO core for RLHF of large language models.

Every op has a Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and a
pure-PyTorch reference (:mod:`fastppo.reference`) that is the CPU path and the ground truth of the
tests. Pick the backend with ``FASTPPO_BACKEND=auto|torch|triton`` or :func:`use_backend`.
"""

from fastppo._backend import get_backend, use_backend
from fastppo._version import __version__ as __version__
from fastppo.advantages import gae, group_advantages, masked_mean, masked_whiten
from fastppo.generation import GenerationOutput, Generator
from fastppo.logprobs import linear_logprobs_and_entropy, logprobs_and_entropy
from fastppo.losses import kl_penalty, policy_loss, value_loss
from fastppo.trainer import (
    AdaptiveKLController,
    FixedKLController,
    LogProbHead,
    PPOConfig,
    PPOTrainer,
    Reference,
    ValueModel,
    completion_logprobs,
    compute_advantages,
    token_rewards,
)
from fastppo.trainer.reward_model import RewardModelConfig, score_texts, train_reward_model
from fastppo.trainer.sft import SFTConfig, sft

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "GenerationOutput",
    "Generator",
    "LogProbHead",
    "PPOConfig",
    "PPOTrainer",
    "Reference",
    "RewardModelConfig",
    "SFTConfig",
    "ValueModel",
    "completion_logprobs",
    "compute_advantages",
    "gae",
    "get_backend",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs_and_entropy",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "score_texts",
    "sft",
    "token_rewards",
    "train_reward_model",
    "use_backend",
    "value_loss",
]
