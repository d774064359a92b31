"""PPOConfig and the ``fastppo train`` command line: types, defaults, help, errors before any model loads."""

import dataclasses
import subprocess
import sys

import pytest

from fastppo.trainer.cli import build_parser, parse_config
from fastppo.trainer.config import SECTIONS, PPOConfig, field_docs

REQUIRED_FLAGS = [
    "--model", "--reward-model", "--reward-fn", "--prompts", "--eval-prompts", "--output-dir", "--max-steps",
    "--rollout-batch-size", "--samples-per-prompt", "--max-new-tokens", "--ignore-eos", "--ppo-epochs",
    "--num-minibatches", "--micro-batch-size", "--advantage", "--learning-rate", "--kl-coef", "--seed", "--resume",
]  # fmt: skip


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no usage dump
    return err


def test_every_field_has_a_docstring_and_unique_name():
    names = []
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            names.append(f.name)
    assert len(names) == len(set(names))


def test_defaults_validate_and_follow_the_field():
    c = PPOConfig().validate()
    assert (c.ppo.clip_low, c.critic.vf_clip, c.ppo.lam, c.ppo.gamma) == (0.2, 0.2, 0.95, 1.0)
    assert (c.kl.kl_coef, c.kl.kl_estimator, c.kl.kl_mode, c.ppo.advantage) == (0.05, "k1", "reward", "gae")


def test_required_flags_exist_and_help_lists_every_field_with_doc_and_default():
    text = build_parser().format_help()
    for flag in REQUIRED_FLAGS:
        assert f"{flag} " in text or f"{flag}\n" in text, flag
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text, f.name
    flat = " ".join(text.split())
    assert "Longest completion in tokens; a stop token ends one earlier. (default: 64)" in flat
    assert flat.count("(default:") >= sum(len(dataclasses.fields(c)) for c in SECTIONS.values())


def test_help_from_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "fastppo", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--max-new-tokens" in out and "--advantage {gae,grpo,rloo}" in out


@pytest.mark.parametrize(
    ("argv", "value"),
    [([], False), (["--ignore-eos"], True), (["--ignore-eos", "false"], False), (["--ignore-eos", "yes"], True)],
)
def test_bool_flags(argv, value):
    assert parse_config(argv).rollout.ignore_eos is value


def test_negated_bool_optional_and_literal_and_lists():
    c = parse_config(
        [
            *["--no-shuffle", "--vf-clip", "none", "--max-prompt-length", "12", "--advantage", "rloo"],
            *["--samples-per-prompt", "4", "--stop-token-ids", "5", "7", "--whiten-advantages", "true"],
            *["--max_new_tokens", "9"],  # the underscored spelling parses too
        ]
    )
    assert c.data.shuffle is False and c.critic.vf_clip is None and c.data.max_prompt_length == 12
    assert c.ppo.advantage == "rloo" and c.rollout.stop_token_ids == [5, 7] and c.ppo.whiten_advantages is True
    assert c.rollout.max_new_tokens == 9 and c.whiten is True
    assert parse_config(["--advantage", "grpo", "--samples-per-prompt", "2"]).whiten is False  # method default


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--advantage", "ppo"], ["--advantage", "invalid choice", "'gae', 'grpo', 'rloo'"]),
        (["--max-new-token", "3"], ["unrecognized", "--max-new-tokens"]),
        (["--max-steps", "x"], ["--max-steps", "invalid int"]),
        (["--ignore-eos", "maybe"], ["--ignore-eos"]),
        (["--temperature", "0"], ["temperature", "> 0"]),
        (["--advantage", "grpo"], ["samples_per_prompt >= 2"]),
        (["--rollout-batch-size", "6", "--num-minibatches", "4"], ["num_minibatches=4", "divide", "6"]),
        (["--num-minibatches", "2", "--micro-batch-size", "3"], ["micro_batch_size=3", "divide", "8"]),
        (["--model", "somewhere"], ["prompts is required"]),
        (["--stop-token-ids", *"12345678"], ["stop_token_ids", "at most 7"]),
    ],
)
def test_bad_values_are_one_line_naming_the_field(capsys, argv, words):
    err = _error(capsys, argv)
    assert err.startswith("fastppo train: error:")
    for w in words:
        assert w in err, (w, err)


def test_yaml_config_nested_or_flat_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  max_new_tokens: 7\n  ignore_eos: true\nlearning_rate: 2.0e-5\n")
    c = parse_config(["--config", str(path), "--max-new-tokens", "11"])
    assert c.rollout.max_new_tokens == 11 and c.rollout.ignore_eos is True and c.ppo.learning_rate == 2e-5
    # the resolved config round-trips through its own yaml
    c.to_yaml(tmp_path / "out.yaml")
    assert PPOConfig.from_yaml(tmp_path / "out.yaml") == c


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("rollout:\n  max_new_tokenz: 7\n", ["rollout.max_new_tokenz", "did you mean 'max_new_tokens'"]),
        ("kl_estimator: k9\n", ["kl_estimator", "k1"]),
        ("ppo_epochs: 1.5\n", ["ppo_epochs", "integer"]),
    ],
)
def test_bad_yaml_is_rejected_naming_the_field(tmp_path, capsys, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _error(capsys, ["--config", str(path)])
    for w in words:
        assert w in err, err


def test_from_dict_rejects_unknown_and_validate_checks_types():
    with pytest.raises(ValueError, match="unknown config field 'lr'"):
        PPOConfig.from_dict({"lr": 1.0})
    with pytest.raises(TypeError, match="ignore_eos must be a bool"):
        PPOConfig.from_dict({"ignore_eos": "yes"}).validate()
    with pytest.raises(ValueError, match="top_p must be in"):
        PPOConfig.from_dict({"top_p": 1.5}).validate()


def test_demo_flags_are_checked_against_the_demo_preset_only(monkeypatch):
    """`fastppo train --num-minibatches 32` divides the demo's batch of 64 (not the plain default of 16)."""
    import fastppo.demo
    from fastppo.trainer import cli

    seen = []
    monkeypatch.setattr(fastppo.demo, "run_preset", lambda config: seen.append(config) or 0)
    assert cli.main(["--num-minibatches", "32"]) == 0
    assert seen[0].ppo.num_minibatches == 32 and seen[0].batch_size % 32 == 0
    assert cli.model_given(["--model", "DIR"]) and not cli.model_given(["--model", "none"])


def test_the_demo_refuses_torchrun_in_one_line(monkeypatch, capsys):
    from fastppo.trainer import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not under torchrun" in err
