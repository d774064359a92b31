"""The PPO trainer: :class:`PPOTrainer`, its :class:`PPOConfig`, and the building blocks it is made of
(public, so that another trainer can reuse them).

Modules, one job each: ``config`` (typed sections), ``cli`` (``fastppo train``), ``data`` (prompts),
``models`` (log-prob head, value model, reference), ``rewards`` (reward function / model, shaping),
``experience`` (rollout, token rewards, KL controllers, advantages), ``update`` (PPO epochs),
``metrics`` (every metric, defined once), ``output`` (files and console), ``trainer`` (the loop).
"""

from fastppo.trainer.config import PPOConfig
from fastppo.trainer.experience import (
    AdaptiveKLController,
    Experience,
    FixedKLController,
    Rollout,
    compute_advantages,
    rollout,
    token_rewards,
)
from fastppo.trainer.metrics import METRICS
from fastppo.trainer.models import LogProbHead, Reference, ValueModel, completion_logprobs
from fastppo.trainer.rewards import RewardError, RewardFunction, RewardModel, RewardShaper
from fastppo.trainer.trainer import PPOTrainer
from fastppo.trainer.update import Learner, NonFiniteError, ppo_update

__all__ = [
    "METRICS",
    "AdaptiveKLController",
    "Experience",
    "FixedKLController",
    "Learner",
    "LogProbHead",
    "NonFiniteError",
    "PPOConfig",
    "PPOTrainer",
    "Reference",
    "RewardError",
    "RewardFunction",
    "RewardModel",
    "RewardShaper",
    "Rollout",
    "ValueModel",
    "completion_logprobs",
    "compute_advantages",
    "ppo_update",
    "rollout",
    "token_rewards",
]
