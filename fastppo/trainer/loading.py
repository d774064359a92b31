"""Turning what a user gives (objects, local folders, ``module:function`` strings) into the trainer's
models, tokenizers and reward. Nothing here downloads: paths must be local folders."""

from __future__ import annotations

import pathlib

import torch
from torch import nn

from fastppo.attention import choose_attn_implementation
from fastppo.trainer.models import ValueModel
from fastppo.trainer.rewards import RewardFunction, RewardModel, load_reward_function

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available")
    return device


def _folder(what: str, path) -> pathlib.Path:
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ValueError(f"{what}: {path} is not a local folder (nothing is downloaded: save the model there first)")
    return folder


def _load_kwargs(mc, device) -> dict:
    attn = mc.attn_implementation
    return dict(
        dtype=_DTYPES[mc.dtype],
        trust_remote_code=mc.trust_remote_code,
        attn_implementation=choose_attn_implementation(device) if attn == "auto" else attn,
    )


def model_config(model, mc):
    """The ``PretrainedConfig`` of a model object or folder (reads only config.json for a folder)."""
    if isinstance(model, nn.Module):
        return model.config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_folder("model", model), trust_remote_code=mc.trust_remote_code)


def max_positions(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def load_causal_lm(model, mc, device) -> nn.Module:
    """A causal LM object (moved to ``device``) or one loaded from a local folder."""
    if isinstance(model, (str, pathlib.Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(_folder("model", model), **_load_kwargs(mc, device))
    if not isinstance(model, nn.Module):
        raise TypeError(f"policy must be a Hugging Face causal LM or a folder path, got {type(model).__name__}")
    return model.to(device)


_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(tokenizer, fallback_path=None):
    """A tokenizer object as given, or loaded from a folder.

    A folder whose ``tokenizer_config.json`` declares the generic fast tokenizer is loaded as exactly
    that: ``AutoTokenizer`` in transformers 5 swaps it for the model type's class when a ``config.json``
    sits beside it (Qwen2's, say), whose own pre-tokenizer then drops every character it does not expect.
    """
    if tokenizer is None and fallback_path is None:
        raise ValueError("tokenizer is required when the policy is given as an object")
    if tokenizer is None or isinstance(tokenizer, (str, pathlib.Path)):
        import json

        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        folder = _folder("tokenizer", tokenizer or fallback_path)
        declared = folder / "tokenizer_config.json"
        declared = json.loads(declared.read_text()).get("tokenizer_class") if declared.is_file() else None
        cls = PreTrainedTokenizerFast if declared in _GENERIC_TOKENIZERS else AutoTokenizer
        tokenizer = cls.from_pretrained(folder)
    return tokenizer


def _has_tokenizer(folder: pathlib.Path) -> bool:
    return any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def same_vocabulary(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def make_reward(reward, policy_tokenizer, mc, rc, device, *, reward_tokenizer=None):
    """A :class:`RewardFunction` (callable, ``"module:function"``) or a :class:`RewardModel` (model
    object or folder, with ``reward_tokenizer``, the folder's own tokenizer, or the policy's)."""
    if isinstance(reward, str) and ":" in reward and not pathlib.Path(reward).is_dir():
        return RewardFunction(load_reward_function(reward))
    if callable(reward) and not isinstance(reward, nn.Module):
        return RewardFunction(reward)
    folder = None
    if isinstance(reward, (str, pathlib.Path)):
        from transformers import AutoModelForSequenceClassification

        folder = _folder("reward_model", reward)
        reward = AutoModelForSequenceClassification.from_pretrained(folder, **_load_kwargs(mc, device))
    if not isinstance(reward, nn.Module) or not hasattr(reward, "config"):
        raise TypeError(
            "reward must be a callable (prompts, completions, **columns), 'module:function', a Hugging Face "
            f"sequence-classification model or its folder; got {type(reward).__name__}"
        )
    if reward_tokenizer is None and mc.reward_tokenizer is not None:
        reward_tokenizer = mc.reward_tokenizer
    if reward_tokenizer is None and folder is not None and _has_tokenizer(folder):
        reward_tokenizer = folder
    tok = load_tokenizer(reward_tokenizer) if reward_tokenizer is not None else policy_tokenizer
    rm = RewardModel(
        reward.to(device), tok, batch_size=rc.reward_batch_size, same_tokenizer=same_vocabulary(tok, policy_tokenizer)
    )
    return rm


def build_critic(critic, policy, reward, config, device) -> ValueModel:
    """The value model: ``critic`` as given, ``critic_model``'s folder, or a copy per ``critic_init``."""
    if critic is not None:
        if not isinstance(critic, nn.Module):
            raise TypeError(f"critic must be a torch module (e.g. fastppo.ValueModel), got {type(critic).__name__}")
        return critic.to(device)
    mc, init = config.model, config.critic.critic_init
    if mc.critic_model is not None:
        from transformers import AutoConfig

        folder = _folder("critic_model", mc.critic_model)
        archs = AutoConfig.from_pretrained(folder, trust_remote_code=mc.trust_remote_code).architectures or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            from transformers import AutoModelForSequenceClassification

            source = AutoModelForSequenceClassification.from_pretrained(folder, **_load_kwargs(mc, device))
            return ValueModel.from_reward_model(source).to(device)
        return ValueModel.from_policy(load_causal_lm(str(folder), mc, device)).to(device)
    shares = isinstance(reward, RewardModel) and reward.same_tokenizer
    if init == "reward" and not shares:
        raise ValueError("critic_init='reward' needs a reward model that uses the policy's tokenizer")
    if init == "reward" or (init == "auto" and shares):
        return ValueModel.from_reward_model(reward.model).requires_grad_(True).to(device)
    return ValueModel.from_policy(policy).requires_grad_(True).to(device)


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio must be 1 on unchanged weights: no dropout anywhere (TRL and OpenRLHF do the same)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        config = getattr(m, "config", None)
        for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
            if config is not None and isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)
