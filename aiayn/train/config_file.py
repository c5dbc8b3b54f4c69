"""What `aiayn train` runs with, from three layers: a preset (aiayn.nn.config.PRESETS) < a config file
(JSON or TOML) < command-line flags. A config file looks like this (JSON: the same keys, nested)::

    preset = "small"            # optional: base, big, small, tiny
    [model]                     # TransformerConfig fields (not the vocabulary's sizes or token ids)
    dropout = 0.2
    [train]                     # the options of `aiayn train`, with underscores (TrainSettings)
    max_tokens = 2500
    warmup = 400
    max_time = 30

Every mistake (a missing or malformed file, an unknown key, a value of the wrong type or range) is a
UserInputError naming the file, line or field, so the command line ends in one line, exit status 2."""

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass

from aiayn.errors import UserInputError

# TransformerConfig field -> its `aiayn train` flag. The vocabulary sets the sizes and token ids,
# so a config file or flag may not.
MODEL_FLAGS = {
    "num_layers": "--layers", "d_model": "--d-model", "d_ff": "--d-ff", "num_heads": "--heads",
    "dropout": "--dropout", "attention_dropout": "--attention-dropout", "ffn_dropout": "--ffn-dropout",
    "label_smoothing": "--label-smoothing", "norm_first": "--norm-first", "share_embeddings": "--share-embeddings",
    "max_len": "--max-len", "layer_norm_eps": "--layer-norm-eps",
}
_VOCAB_FIELDS = ("src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id", "eos_id")
DEFAULT_PRESET = "base"


@dataclass
class TrainSettings:
    """The options of `aiayn train` besides files and the model's shape (defaults = the flags')."""
    steps: int = 100_000
    max_epochs: int | None = None    # stop after this many passes over the training pairs
    max_time: float | None = None    # minutes of training (the loop's wall-clock time, summed over resumes)
    max_tokens: int = 25000
    micro_tokens: int = 0
    warmup: int = 4000
    lr_scale: float = 1.0
    clip_norm: float = 0.0
    bf16: bool = False
    seed: int = 1
    vocab_size: int = 8000
    vocab_type: str = "bpe"
    save_every: int = 1000
    keep_last: int = 0
    valid_every: int = 1000          # 0 = only at epoch ends (--valid-every-epoch) and at the end
    valid_every_epoch: bool = False
    bleu_sentences: int = 500
    beam: int = 4
    alpha: float = 0.6
    early_stop: int | None = None    # patience: validations without a new best

    def options(self):
        """The aiayn.train.TrainOptions part (what the training state stores and resume reuses)."""
        from aiayn.train.trainer import TrainOptions

        return TrainOptions(max_tokens=self.max_tokens, micro_tokens=self.micro_tokens, warmup=self.warmup,
                            lr_scale=self.lr_scale, clip_norm=self.clip_norm, bf16=self.bf16, seed=self.seed)


# (test, what it must be) per TrainSettings field; None values (no limit) are not checked.
_POSITIVE = (lambda v: v >= 1, "an integer >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_RULES = {
    "steps": _POSITIVE, "max_epochs": _POSITIVE, "max_tokens": _POSITIVE, "warmup": _POSITIVE,
    "vocab_size": _POSITIVE, "save_every": _POSITIVE, "beam": _POSITIVE, "early_stop": _POSITIVE,
    "max_time": (lambda v: v > 0, "> 0 (minutes)"), "lr_scale": (lambda v: v > 0, "> 0"),
    "micro_tokens": _NON_NEGATIVE, "keep_last": _NON_NEGATIVE, "valid_every": _NON_NEGATIVE,
    "bleu_sentences": _NON_NEGATIVE, "clip_norm": _NON_NEGATIVE, "alpha": _NON_NEGATIVE,
    "vocab_type": (lambda v: v in ("bpe", "unigram"), "bpe or unigram"),
}


def flag(name):
    return MODEL_FLAGS.get(name) or "--" + name.replace("_", "-")


@dataclass
class Resolved:
    """The merged layers: `model` holds TransformerConfig fields but the vocabulary's; `sources`
    says where each value set above the defaults came from (for error messages)."""
    preset: str | None
    model: dict
    settings: TrainSettings
    sources: dict
    config_file: str | None = None

    def transformer_config(self, vocab_size):
        """The TransformerConfig for a shared vocabulary of `vocab_size` pieces; an invalid field
        is a UserInputError naming it and where it was set."""
        from aiayn.nn import TransformerConfig

        try:
            return TransformerConfig(**self.model, src_vocab_size=vocab_size, tgt_vocab_size=vocab_size)
        except (ValueError, TypeError) as e:
            message = re.sub(r"^TransformerConfig:\s*", "", str(e))
            named = [n for n in dict.fromkeys(re.findall(r"'(\w+)'", message)) if n in self.sources]
            where = ", ".join(f"{n} from {self.sources[n]}" for n in named)
            raise UserInputError(f"invalid model config: {message}" + (f" ({where})" if where else "")) from None


def _type_name(t):
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[t]


def _check_type(name, value, annotation, where):
    """Raises unless `value` fits a field annotated `annotation` (int, float, bool, str, X | None);
    JSON and TOML write 1 for 1.0, so an integer passes for a float."""
    args = typing.get_args(annotation)
    base = next(a for a in args if a is not type(None)) if args else annotation
    if value is None and type(None) in args:
        return value
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, str) if base is str else
          isinstance(value, (int, float)) and not isinstance(value, bool) and (base is float or isinstance(value, int)))
    if not ok:
        raise UserInputError(f"{where}: {name} must be {_type_name(base)}, got {value!r}")
    return float(value) if base is float else value


_MODEL_TYPES = None


def _model_types():
    global _MODEL_TYPES
    if _MODEL_TYPES is None:
        from aiayn.nn import TransformerConfig

        _MODEL_TYPES = {f.name: f.type for f in dataclasses.fields(TransformerConfig)}
    return _MODEL_TYPES


_TRAIN_TYPES = {f.name: f.type for f in dataclasses.fields(TrainSettings)}


def read_config_file(path):
    """{"preset": str | None, "model": {...}, "train": {...}} from a .json or .toml file, checked for
    syntax, unknown keys and value types (ranges are checked once the layers are merged)."""
    if not os.path.isfile(path):
        raise UserInputError(f"config file {path!r} does not exist" if not os.path.exists(path)
                             else f"config file {path!r} is not a regular file")
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".json", ".toml"):
        raise UserInputError(f"config file {path!r}: the name must end in .json or .toml")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserInputError(f"config file {path!r} is not UTF-8 text (byte {e.start})") from None
    if kind == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserInputError(f"config file {path!r} is not valid JSON: line {e.lineno}, column {e.colno}: "
                                 f"{e.msg}") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise UserInputError(f"config file {path!r}: reading TOML needs Python >= 3.11 (or the tomli "
                                     "package); use a .json file") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserInputError(f"config file {path!r} is not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"config file {path!r} must hold an object with keys preset, model, train")
    unknown = sorted(set(data) - {"preset", "model", "train"})
    if unknown:
        raise UserInputError(f"config file {path!r}: unknown key(s) {', '.join(unknown)} "
                             "(expected preset, model, train)")
    preset = data.get("preset")
    if preset is not None:
        check_preset(preset, f"config file {path!r}: preset")
    out = {"preset": preset}
    for section, types, known in (("model", _model_types(), MODEL_FLAGS), ("train", _TRAIN_TYPES, _TRAIN_TYPES)):
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise UserInputError(f"config file {path!r}: {section} must be a table / object of fields")
        vocab = sorted(set(values) & set(_VOCAB_FIELDS))
        if vocab:
            raise UserInputError(f"config file {path!r}: {section}.{vocab[0]} comes from the vocabulary "
                                 "and cannot be set")
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserInputError(f"config file {path!r}: unknown {section} field(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")
        out[section] = {k: _check_type(f"{section}.{k}", v, types[k], f"config file {path!r}")
                        for k, v in values.items()}
    return out


def check_preset(name, what="--preset"):
    from aiayn.nn.config import PRESETS

    if name not in PRESETS:
        raise UserInputError(f"{what}: unknown preset {name!r} (choose one of {', '.join(sorted(PRESETS))})")
    return name


def resolve(config=None, preset=None, model_flags=None, train_flags=None, run_config=None, run_settings=None):
    """Merges preset < config file < flags. `config` is a preset name or a .json / .toml file;
    `preset` a preset named by --preset; `model_flags` / `train_flags` hold only the flags given.
    `run_config` (a resumed run's TransformerConfig dict) is the model's base when no preset is
    named anywhere, so `--resume` needs no model flags; without it the base is DEFAULT_PRESET.
    `run_settings` (a resumed run's TrainSettings dict) replaces the defaults the same way."""
    from aiayn.nn.config import PRESETS

    file_data, config_file = {"preset": None, "model": {}, "train": {}}, None
    if config is not None:
        if config in PRESETS:
            if preset is not None and preset != config:
                raise UserInputError(f"--config {config} and --preset {preset} name two presets; give one")
            preset = config
        elif os.path.splitext(config)[1].lower() in (".json", ".toml") or os.path.exists(config):
            config_file = config
            file_data = read_config_file(config)
        else:
            raise UserInputError(f"--config {config!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                                 "nor a .json / .toml file")
    if preset is not None:
        check_preset(preset)
    chosen = preset or file_data["preset"]
    sources = {}
    if chosen is None and run_config is not None:
        model = {k: v for k, v in run_config.items() if k not in _VOCAB_FIELDS}
        sources.update(dict.fromkeys(model, "the resumed run"))
    else:
        chosen = chosen or DEFAULT_PRESET
        model = dict(PRESETS[chosen])
        sources.update(dict.fromkeys(model, f"preset {chosen}"))
        if run_config is not None:  # the ids are the vocabulary's, like the run's
            model.update({k: run_config[k] for k in ("pad_id", "bos_id", "eos_id") if k in run_config})
    for layer, where in ((file_data["model"], f"config file {config_file!r}"),
                         (model_flags or {}, None)):
        for k, v in layer.items():
            if v is None:
                continue
            model[k] = v
            sources[k] = where or MODEL_FLAGS[k]

    values = {k: v for k, v in (run_settings or {}).items() if k in _TRAIN_TYPES}
    sources.update(dict.fromkeys(values, "the resumed run"))
    checked = set()
    for layer, where in ((file_data["train"], f"config file {config_file!r}"), (train_flags or {}, None)):
        for k, v in layer.items():
            if k not in _TRAIN_TYPES:
                raise UserInputError(f"unknown training option {k!r}")
            if v is None:
                continue
            values[k] = _check_type(k, v, _TRAIN_TYPES[k], where or flag(k))
            sources[k] = where or flag(k)
            checked.add(k)
    for k in sorted(checked):
        v = values[k]
        test, expected = _RULES.get(k, (None, None))
        if test is not None and v is not None and not test(v):
            place = sources[k]
            name = place if place.startswith("--") else f"{place}: train.{k}"
            raise UserInputError(f"{name} must be {expected}, got {v!r}")
    return Resolved(preset=chosen, model=model, settings=TrainSettings(**values), sources=sources,
                    config_file=config_file)
