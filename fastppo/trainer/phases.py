"""The named phases of a trainer step, as profiler ranges (verl's names, so traces compare).

==================  ===============================================================================
``step``            one whole :meth:`PPOTrainer.step`
``gen``             the rollout: sampling completions with :class:`fastppo.Generator`
``reward``          scoring the completions (reward function or reward model) and shaping the scores
``old_log_prob``    the rollout policy's log-probs and entropy of the completions (no grad)
``ref``             the reference policy's log-probs (no grad)
``values``          the critic's values of the completions (no grad)
``adv``             reward shaping, per-token KL, token rewards, advantages and returns, the KL controller's update
``update_actor``    the policy's forward + backward of each micro-batch, and its optimizer steps
``update_critic``   the critic's forward + backward of each micro-batch, and its optimizer steps
==================  ===============================================================================

``fastppo profile`` reads these ranges out of a ``torch.profiler`` trace; outside a profiler
:func:`phase` costs nothing.
"""

from __future__ import annotations

import contextlib

import torch

PHASES = ("step", "gen", "reward", "old_log_prob", "ref", "values", "adv", "update_actor", "update_critic")


def phase(name: str):
    """A ``record_function(name)`` range while a profiler records, else a no-op context."""
    # record_function costs a few microseconds even when nothing records: only pay it under a profiler
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
