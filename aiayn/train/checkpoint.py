"""Checkpoints of a training run directory: the model as safetensors (`model.save`, config in the
file's metadata) and the rest of the training state (optimizer, scheduler, RNG, step, data
position, log) with torch.save; both written atomically (temp file + os.replace), so a crash never
leaves a half-written file under a checkpoint's name. Averaging of the last N checkpoints (§6.1:
the base models average the last 5, the big ones the last 20). The model a run directory stands
for (resolve_model_file): averaged.safetensors, else best.safetensors, else the newest checkpoint."""

import os
import re
import tempfile

import torch

from aiayn.errors import UserInputError

_NAME = re.compile(r"^checkpoint_(\d+)\.safetensors$")
AVERAGED = "averaged.safetensors"
BEST, BEST_INFO = "best.safetensors", "best.json"   # the best model by dev BLEU (or loss), its step and score


def model_path(out_dir, step):
    return os.path.join(out_dir, f"checkpoint_{step:08d}.safetensors")


def state_path(out_dir, step):
    return os.path.join(out_dir, f"checkpoint_{step:08d}.state.pt")


def checkpoint_steps(out_dir):
    """Steps of the checkpoints in `out_dir` (those with a model file), ascending."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(out_dir)) if m)


def atomic_write(path, write):
    """Calls write(temp_path) on a temp file next to `path`, then renames it to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(out_dir, step, model, state, keep_last=None):
    """Writes the model and the training state of `step`; keeps only the newest `keep_last`
    checkpoints when given. The state is written last: a checkpoint is complete once it exists."""
    os.makedirs(out_dir, exist_ok=True)
    model.save(model_path(out_dir, step))
    atomic_write(state_path(out_dir, step), lambda tmp: torch.save(state, tmp))
    if keep_last:
        for old in checkpoint_steps(out_dir)[:-keep_last]:
            for path in (model_path(out_dir, old), state_path(out_dir, old)):
                if os.path.exists(path):
                    os.remove(path)


def load_model(path, map_location="cpu"):
    """The Transformer stored in a safetensors file; a missing, truncated or corrupt file is a
    UserInputError naming it."""
    from aiayn.nn import Transformer

    if not os.path.isfile(path):
        raise UserInputError(f"checkpoint {path!r} does not exist")
    try:
        model = Transformer.load(path)
    except Exception as e:  # noqa: BLE001  (any failure to parse the user's file is reported as such)
        raise UserInputError(f"checkpoint {path!r} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return model.to(map_location)


def load_state(path):
    """The training state saved next to a model checkpoint."""
    if not os.path.isfile(path):
        raise UserInputError(f"training state {path!r} does not exist (the checkpoint is incomplete)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserInputError(f"training state {path!r} is truncated or corrupt ({type(e).__name__}: {e})") from None


def config_mismatch(expected, found):
    """A readable list of the config fields that differ ('' when none do)."""
    keys = sorted(set(expected) | set(found))
    return ", ".join(f"{k}={found.get(k)!r} (expected {expected.get(k)!r})"
                     for k in keys if expected.get(k) != found.get(k))


def check_config(model, expected_config, path):
    """Raises a UserInputError when the checkpoint's model config is not `expected_config`."""
    diff = config_mismatch(expected_config.to_dict(), model.config.to_dict())
    if diff:
        raise UserInputError(f"checkpoint {path!r} holds a model of another config: {diff}")


def resolve_model_file(path):
    """A model file from a path that is either a .safetensors file or a run directory: its
    averaged.safetensors (`aiayn average-checkpoints`, made on purpose, so it wins) if present, else
    best.safetensors (the best by dev BLEU, or dev loss without BLEU), else the newest
    checkpoint_<step>.safetensors."""
    if os.path.isdir(path):
        for name in (AVERAGED, BEST):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        steps = checkpoint_steps(path)
        if not steps:
            raise UserInputError(f"checkpoint directory {path!r} holds no {AVERAGED}, {BEST} or "
                                 "checkpoint_*.safetensors file")
        return model_path(path, steps[-1])
    if not os.path.exists(path):
        raise UserInputError(f"checkpoint {path!r} does not exist")
    return path


def average_state_dicts(states):
    """The element-wise mean of state dicts with the same keys (summed in float64)."""
    sums = {k: v.detach().double().clone() for k, v in states[0].items()}
    for state in states[1:]:
        for k, v in state.items():
            sums[k] += v.detach().double()
    return {k: (v / len(states)).to(states[0][k].dtype) for k, v in sums.items()}


def average_models(paths):
    """A model whose parameters are the element-wise mean of the checkpoints' (same config)."""
    if not paths:
        raise UserInputError("no checkpoints to average")
    first = load_model(paths[0])
    states = [first.state_dict()]
    for path in paths[1:]:
        model = load_model(path)
        check_config(model, first.config, path)
        states.append(model.state_dict())
    first.load_state_dict(average_state_dicts(states))
    return first


def average_checkpoints(out_dir, last=5, output=None):
    """Averages the newest `last` checkpoints of a run directory into `output` (default
    out_dir/averaged.safetensors); returns (output path, steps averaged)."""
    if not os.path.isdir(out_dir):
        raise UserInputError(f"checkpoint directory {out_dir!r} does not exist")
    if last < 1:
        raise UserInputError(f"--last must be >= 1, got {last}")
    steps = checkpoint_steps(out_dir)
    if not steps:
        raise UserInputError(f"checkpoint directory {out_dir!r} holds no checkpoint_*.safetensors file")
    steps = steps[-last:]
    model = average_models([model_path(out_dir, s) for s in steps])
    output = output or os.path.join(out_dir, AVERAGED)
    model.save(output)
    return output, steps
