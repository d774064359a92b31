"""``fastppo train``: the command line of the trainer.

    fastppo train [--config FILE.yaml] [--<any PPOConfig field> VALUE ...]

Parsed by ``transformers.HfArgumentParser`` over the sections of :class:`PPOConfig`: one flag per field
(``--max-new-tokens``, or ``--max_new_tokens``), its ``--help`` text the field's docstring. Booleans take
``--flag``, ``--flag false`` or ``--no-flag`` (fields that default to True); optional fields take
``none``. Values come, lowest first, from the dataclass defaults, a preset (the built-in demo's, when
no ``--model`` is given), ``--config FILE.yaml`` (nested by section or flat), then the flags. Every
value is validated before anything loads; an error is one line naming the field.

Exit status: 0 when the run ends, also when SIGTERM / SIGINT stopped it after a checkpoint (``--resume``
continues it); 1 when a loss, reward or gradient became NaN / infinite (the last checkpoint is kept);
2 for a bad flag, config or data.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys

from fastppo.trainer.config import SECTIONS, PPOConfig, field_docs, field_owners

PROG = "fastppo train"
_NONE = ("none", "null")
_METAVARS = {
    **dict.fromkeys(["model", "tokenizer", "reward_model", "reward_tokenizer", "critic_model", "output_dir"], "DIR"),
    **dict.fromkeys(["prompts", "eval_prompts"], "FILE"),
    "reward_fn": "MODULE:FN",
    "device": "DEVICE",
    "prompt_column": "NAME",
}


def build_parser(prog: str = PROG):
    """The ``HfArgumentParser`` over every section (built on demand: it imports transformers)."""
    from transformers import HfArgumentParser

    class OneLineErrors(HfArgumentParser):
        def error(self, message):  # argparse prints the whole usage first: 60 flags of noise
            sys.stderr.write(f"{self.prog}: error: {message}\n")
            raise SystemExit(2)

    parser = OneLineErrors(
        list(SECTIONS.values()),
        prog=prog,
        usage=f"{prog} [--config FILE.yaml] [--FIELD VALUE ...]",
        description="PPO for a Hugging Face causal LM with fastppo's kernels (no --model: the built-in demo).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE.yaml", default=None, help="read field values from a YAML file")
    docs = {}
    optional = set()
    for cls in SECTIONS.values():
        docs.update(field_docs(cls))
        hints = _hints(cls)
        optional |= {f.name for f in dataclasses.fields(cls) if type(None) in getattr(hints[f.name], "__args__", ())}
    for action in parser._actions:
        if action.dest not in docs:
            continue
        negates = " [negates the flag]" if action.option_strings[0].startswith("--no") else ""
        action.help = docs[action.dest].replace("%", "%%") + negates  # argparse formats help with %
        if action.nargs == "?" or getattr(action.type, "__name__", "") == "string_to_bool":
            action.metavar = "BOOL"
        elif action.choices is None and action.type is not None:
            action.metavar = _METAVARS.get(action.dest, "N" if action.type in (int, float) else "VALUE")
        if action.dest in optional and action.type is not None and action.nargs != "?":
            action.type = _none_or(action.type)
        # show the dashed spelling only; the underscored one still parses (argparse looks options up
        # in its own table, not in option_strings)
        dashed = [o for o in action.option_strings if "_" not in o]
        action.option_strings = dashed or action.option_strings
    return parser


def _hints(cls):
    import typing

    return typing.get_type_hints(cls)


def _none_or(convert):
    def parse(text):
        return None if isinstance(text, str) and text.lower() in _NONE else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def parse_config(argv=None, *, base: dict | None = None, prog: str = PROG) -> PPOConfig:
    """The validated :class:`PPOConfig` of a command line. ``base``: flat or nested field values that
    replace the dataclass defaults (a preset); ``--config FILE.yaml`` overrides them, the flags override both.
    Exits with status 2 and a one-line message on any bad value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    try:
        layered = PPOConfig.from_dict(base or {})
        if known.config is not None:
            layered = PPOConfig.from_dict({**_flat(layered), **_flat(PPOConfig.from_yaml(known.config))})
    except (OSError, ValueError, TypeError) as e:
        parser.error(f"--config {known.config}: {e}" if known.config else str(e))
    parser.set_defaults(**_flat(layered))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        near = difflib.get_close_matches(flag.split("=")[0], [o for a in parser._actions for o in a.option_strings], 1)
        parser.error(f"unrecognized argument {flag}" + (f" (did you mean {near[0]}?)" if near else ""))
    values = {k: v for k, v in vars(namespace).items() if k in field_owners()}
    try:
        return PPOConfig.from_dict(values).validate()
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def _flat(config: PPOConfig) -> dict:
    return {k: v for section in config.to_dict().values() for k, v in section.items()}


def model_given(argv) -> bool:
    """Whether the command line or its ``--config`` file names a model. It decides the base under the
    flags (the demo's preset or the plain defaults), so that the flags are validated once, against the
    right one; a bad file is parse_config's to report."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.model is not None:
        return known.model.lower() not in _NONE
    if known.config is None:
        return False
    try:
        return PPOConfig.from_yaml(known.config).model.model is not None
    except (OSError, ValueError, TypeError):
        return False


def main(argv=None) -> int:
    """``fastppo train``: a run from the command line (the built-in demo when no ``--model`` is given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not model_given(argv):
        from fastppo.demo import PRESET, run_preset
        from fastppo.trainer.distributed import torchrun_env

        config = parse_config(argv, base=PRESET)
        if torchrun_env():
            sys.stderr.write(
                f"{PROG}: error: the built-in demo (no --model) runs in one process, not under torchrun: run "
                "`fastppo train`, or give torchrun a --model, --prompts and a reward\n"
            )
            return 2
        return run_preset(config)
    config = parse_config(argv)
    from fastppo.trainer.trainer import PPOTrainer

    try:  # bad data or lengths are found while setting up: one line, as the flags' errors
        trainer = PPOTrainer.from_config(config)
    except (ValueError, TypeError) as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    return run(trainer)


def run(trainer) -> int:
    """``trainer.train()`` with the command line's exit status: a NaN / inf stop is one line naming the
    step, the quantity and the checkpoint left to resume from, and status 1."""
    from fastppo.trainer.checkpoint import latest_checkpoint
    from fastppo.trainer.update import NonFiniteError

    try:
        trainer.train()
    except NonFiniteError as e:
        last = latest_checkpoint(trainer.config.run.output_dir)
        kept = f"; the last checkpoint, {last}, is intact (--resume continues from it)" if last else ""
        sys.stderr.write(f"{PROG}: error: {e}{kept}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
