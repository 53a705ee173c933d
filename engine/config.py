"""Config dataclasses, named presets and ``--key=value`` overrides.

Each stage describes itself with plain dataclasses (an architecture config nested inside a training
config). Presets are dicts of overrides, like open_clip's named model configs; the command line adds
more overrides on top. No config framework: ``apply_overrides`` walks the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Mapping

import torch

from .ema import MAX_EMA_STD
from .errors import UserError


class ConfigError(UserError):
    """A config key or value that does not fit the stage's config."""


@dataclass
class TrainConfig:
    """Settings of the shared training engine, the same for every stage.

    ``batch_size`` is the *global* batch per optimizer step: with N processes and ``grad_accum`` micro-steps
    each process runs ``batch_size // (N * grad_accum)`` samples per forward. Keeping the global batch fixed
    keeps the learning rate valid when the number of GPUs changes.
    """

    epochs: int = 10
    # An epoch walks the training set this often (a fresh permutation each pass): small sets get fewer,
    # longer epochs, so validation, grids and checkpoints happen a dozen times per run, not hundreds.
    passes_per_epoch: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    # max global grad norm; 0 disables clipping and the gradient-norm log and spike rule that read the clipped norm
    # (a step whose gradient is not finite is skipped either way)
    grad_clip: float = 1.0
    # On a loss spike (engine.runlog's rule on each log interval's mean gradient norm): go back to the state of
    # two log intervals before, scale the learning rate by spike_lr_backoff for the rest of the run, and go on;
    # at most spike_rollbacks times (0: only warn). Needs grad_clip > 0 (clipping measures the norm).
    spike_rollbacks: int = 0
    spike_lr_backoff: float = 0.7
    grad_accum: int = 1
    ema_decay: float = 0.0  # 0 disables EMA (unless ema_std is set)
    # > 0: EDM2's power-function EMA instead, its window this share of the steps so far (engine.ema.EMA)
    ema_std: float = 0.0
    # power-function EMAs tracked beside the stage's own and scored by its epoch callback (not saved): one run
    # then tells which EMA length suits it (the UNet logs val/loss_ema_std_<std> for each)
    ema_probe_stds: tuple[float, ...] = ()
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    seed: int = 0
    log_every: int = 20  # steps between host syncs for logging
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # 0: checkpoint at epoch ends only
    compile: bool = False  # torch.compile the training module
    # replay the stage's network's training forward and backward from CUDA graphs (engine.graphed_training): the
    # eager kernels without the launch gaps, no compile; one CUDA process, grad_accum 1; the UNet stage offers it
    cuda_graph: bool = False
    # NHWC activations on CUDA. Off by default: with GroupNorm everywhere it was slower on an H100 with
    # torch 2.11 (VAE 139 vs 189, UNet 260 vs 292 samples/s; docs/results/bench/step_speed.json).
    channels_last: bool = False
    # under bf16 autocast, run the model's GroupNorm/LayerNorm in bf16 rather than autocast's fp32 (statistics
    # still accumulate in fp32 in the kernel): fewer memory passes per step. Needs norms from engine.precision.
    low_precision_norms: bool = False
    # torch.use_deterministic_algorithms while the stage trains, so that two CUDA runs of one config differ only by
    # what they were told to do and one pair of runs measures a lever (the UNet then repeats on an H200; its speed
    # cost is not isolated yet: docs/results/quality). Attention's backward then leaves cuDNN for kernels with a
    # deterministic backward; an op with no deterministic kernel stops the run with torch's error naming it. CPU
    # training is deterministic either way.
    deterministic: bool = False
    # let SDPA pick cuDNN's fused attention, torch's default on Hopper GPUs (the fastest there:
    # docs/results/bench/attention_backends.json); false keeps to the flash and memory-efficient kernels, the
    # remedy when cuDNN's attention backward turns finite inputs into NaN gradients (engine.nonfinite says so)
    cudnn_attention: bool = True

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix."""
        require_positive(self, "epochs", "passes_per_epoch", "batch_size", "grad_accum", "log_every",
                         "checkpoint_every_epochs")
        # AdamW would refuse these only when the stage builds its optimizer, after the stages before it trained;
        # a negative min_lr_ratio it would not refuse at all (the cosine would end in gradient ascent)
        if not 0.0 <= self.lr < math.inf:
            raise ConfigError(f"lr must be a finite number >= 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1] (the cosine's end, a share of lr), got "
                              f"{self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.weight_decay < math.inf or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError(f"weight_decay, warmup_steps and grad_clip must be >= 0 (grad_clip 0: no clipping), "
                              f"got {self.weight_decay}, {self.warmup_steps} and {self.grad_clip}")
        if self.checkpoint_every_steps < 0 or self.checkpoint_every_steps % self.log_every:
            # a checkpoint inside a log interval would resume into a shorter first interval: another log and
            # another gradient-norm history for the spike rule than the uninterrupted run's
            raise ConfigError(f"checkpoint_every_steps must be >= 0 (0: at epoch ends only) and a multiple of "
                              f"log_every={self.log_every}, got {self.checkpoint_every_steps}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be 'auto', 'bf16' or 'fp32', got '{self.precision}'")
        if self.spike_rollbacks < 0:
            raise ConfigError(f"spike_rollbacks must be >= 0 (0: only warn of a spike), got {self.spike_rollbacks}")
        if not 0.0 < self.spike_lr_backoff <= 1.0:
            raise ConfigError(f"spike_lr_backoff must be in (0, 1] (the learning rate's scale after a rollback), got "
                              f"{self.spike_lr_backoff}")
        if self.spike_rollbacks and self.grad_clip <= 0:
            raise ConfigError(f"spike_rollbacks={self.spike_rollbacks} watches the gradient norm, which is measured "
                              "when clipping: set grad_clip > 0, or spike_rollbacks=0")
        if self.cuda_graph and (self.compile or self.grad_accum > 1):
            raise ConfigError("cuda_graph=true replays one eager forward and backward per step: set compile=false "
                              f"and grad_accum=1 (got compile={self.compile}, grad_accum={self.grad_accum}), or "
                              "cuda_graph=false")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 disables EMA), got {self.ema_decay}")
        if self.ema_decay > 0 and self.ema_std > 0:
            raise ConfigError(f"ema_decay={self.ema_decay} and ema_std={self.ema_std} both ask for the EMA; set one "
                              "of them to 0")
        widths = [("ema_std", self.ema_std)] if self.ema_std else []
        for name, std in widths + [("ema_probe_stds", std) for std in self.ema_probe_stds]:
            if not 0.0 < std < MAX_EMA_STD:
                raise ConfigError(f"{name}: {std} is no power-function EMA width; use a share of the steps in "
                                  f"(0, {MAX_EMA_STD:.3f}), e.g. 0.05 to 0.15")


def require_positive(cfg: Any, *names: str) -> None:
    """Raise ``ConfigError`` for the first of ``names``, integer fields of ``cfg`` or tuples of them, below 1:
    a size of 0 would otherwise fail late, inside a division or a layer, without naming the field."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, tuple) and min(value, default=0) < 1:
            raise ConfigError(f"{type(cfg).__name__}: {name} needs at least one entry, each >= 1, got {value}")
        if not isinstance(value, tuple) and value < 1:
            raise ConfigError(f"{type(cfg).__name__}: {name} must be >= 1, got {value}")


def validate_config(cfg: Any) -> Any:
    """The one way configs are checked: ``validate()`` of every nested config, innermost first, then of
    ``cfg`` itself. Each raises ``ConfigError`` naming the field and the fix. Returns ``cfg``."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            validate_config(value)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# TrainConfig fields of how a training runs, not of what it learns: a checkpoint or a finished stage that differs
# only in these is the same training (a --concurrent study, for one, trains its variants eagerly). The spike
# rollback is a policy for a run gone wrong: a run that never spikes learns the same with or without it.
HOW_IT_RUNS = ("compile", "cuda_graph", "log_every", "checkpoint_every_epochs", "checkpoint_every_steps",
               "spike_rollbacks", "spike_lr_backoff", "deterministic", "cudnn_attention")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config (a dataclass or its dict) as ``{"dotted.key": value}`` in its recorded JSON form, the form
    ``--STAGE.key=value`` overrides take."""
    if not prefix:  # once, at the top: the recorded JSON form (tuples as lists, paths as strings)
        config = json.loads(json.dumps(config_to_dict(config) if is_dataclass(config) else config, default=str))
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


UNRECORDED = "unrecorded"  # dataclass field metadata key: see unrecorded_values


def unrecorded_values(cfg: Any) -> dict[str, Any]:
    """``dotted.path -> value`` of the fields of config ``cfg`` (an instance or a class) declared with
    ``metadata={UNRECORDED: value}``: settings added after stages were first recorded, with the value a record
    that lacks them was trained with, so older stages and checkpoints still compare equal to what they did."""
    out: dict[str, Any] = {}
    for path, (_, f, _) in _leaves(cfg() if isinstance(cfg, type) else cfg).items():
        if UNRECORDED in f.metadata:
            out[path] = f.metadata[UNRECORDED]
    return out


def setting_differences(asked: Mapping[str, Any], recorded: Mapping[str, Any],
                        unrecorded: Mapping[str, Any] | None = None) -> list[str]:
    """Flattened settings that differ in what the training learns (``HOW_IT_RUNS`` aside), one line each; a key
    the record lacks reads as its ``unrecorded`` value (``unrecorded_values``), else as None."""
    unrecorded = unrecorded or {}
    was = lambda key: recorded.get(key, unrecorded.get(key))  # noqa: E731
    return [f"{key} was {was(key)!r}, now {value!r}" for key, value in asked.items()
            if key.rsplit(".", 1)[-1] not in HOW_IT_RUNS and was(key) != value]


def choose_preset(preset: str | None) -> str:
    """The ``full`` preset on a CUDA machine, ``tiny`` otherwise, unless one is named."""
    if preset is not None:
        return preset
    return "full" if torch.cuda.is_available() else "tiny"


def preset_reason(preset: str | None) -> str:
    """Why ``choose_preset`` picks what it picks, for the run's printout and records."""
    if preset is not None:
        return "named with --preset"
    return "a GPU was found" if torch.cuda.is_available() else "no GPU found"


def _leaves(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field, Any]]:
    """Every settable field as ``dotted.path -> (owning dataclass, field, type hint)``."""
    out: dict[str, tuple[Any, dataclasses.Field, Any]] = {}
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(_leaves(value, prefix=f"{path}."))
        else:
            out[path] = (cfg, f, hints.get(f.name, f.type))
    return out


def _coerce(raw: Any, hint: Any, key: str) -> Any:
    """Turn a command-line string (or a JSON value) into the field's type."""
    if not isinstance(raw, str):
        if hint is float and isinstance(raw, int):
            return float(raw)
        if typing.get_origin(hint) is tuple and isinstance(raw, list):
            return tuple(raw)
        return raw
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw
        if origin is tuple:
            parts = [p.strip() for p in raw.strip("()[] ").split(",") if p.strip()]
            if args and args[-1] is not Ellipsis:  # tuple[float, float]: exactly that many, each its own type
                if len(parts) != len(args):
                    raise ConfigError(f"config key '{key}' takes {len(args)} comma-separated values, got {raw!r}")
                return tuple(_coerce(p, t, key) for p, t in zip(parts, args))
            return tuple(_coerce(p, args[0] if args else str, key) for p in parts)
        if origin in (typing.Union, types.UnionType):
            if raw.lower() in ("none", "null"):
                return None
            for candidate in (a for a in args if a is not type(None)):
                try:
                    return _coerce(raw, candidate, key)
                except ConfigError:
                    continue
            raise ValueError(raw)
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"config key '{key}': cannot read {raw!r} as {getattr(hint, '__name__', hint)}") from None
    return json.loads(raw)


def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Set fields of ``cfg`` (in place) from ``{"key": value}``; returns ``cfg``.

    A bare key (``lr``) must name exactly one field anywhere in the nested config; a dotted key
    (``train.lr``) names one path. Unknown or ambiguous keys raise ``ConfigError`` with suggestions.
    """
    leaves = _leaves(cfg)
    for key, raw in overrides.items():
        key = key.replace("-", "_")
        matches = [p for p in leaves if p == key or p.endswith("." + key)]
        if len(matches) > 1 and key in leaves:
            matches = [key]
        if not matches:
            close = difflib.get_close_matches(key, list(leaves) + [p.rsplit(".", 1)[-1] for p in leaves], n=3)
            hint = f" Did you mean: {', '.join(sorted(set(close)))}?" if close else ""
            raise ConfigError(f"unknown config key '{key}' for {type(cfg).__name__}.{hint}")
        if len(matches) > 1:
            raise ConfigError(f"config key '{key}' is ambiguous ({', '.join(matches)}); use the dotted name")
        owner, f, hint_type = leaves[matches[0]]
        setattr(owner, f.name, _coerce(raw, hint_type, key))
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a (nested) dataclass config from ``config_to_dict`` output; unknown keys are an error. A key the
    data lacks takes its ``UNRECORDED`` value where the field declares one (what records from before it trained
    with), else the field's default."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)} for {cls.__name__} (written by another code version?)")
    kwargs = {f.name: f.metadata[UNRECORDED] for f in fields(cls) if f.name not in data and UNRECORDED in f.metadata}
    for name, value in data.items():
        hint = hints[name]
        if is_dataclass(hint) and isinstance(value, Mapping):
            kwargs[name] = config_from_dict(hint, value)
        else:
            kwargs[name] = _coerce(value, hint, name)
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["--lr=3e-4", "--model.depth=2"]`` -> ``{"lr": "3e-4", "model.depth": "2"}``."""
    out: dict[str, str] = {}
    for item in items:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"cannot read argument {item!r}: config overrides are written --key=value")
        key, value = item[2:].split("=", 1)
        out[key] = value
    return out


def build_config(cls: type, presets: Mapping[str, Mapping[str, Any]], preset: str | None,
                 overrides: Mapping[str, Any] | None = None) -> Any:
    """Default config of ``cls``, then the named preset's overrides, then the caller's; validated."""
    name = choose_preset(preset)
    if name not in presets:
        raise ConfigError(f"unknown preset '{name}'; choose one of {sorted(presets)}")
    cfg = cls()
    apply_overrides(cfg, presets[name])
    apply_overrides(cfg, overrides or {})
    return validate_config(cfg)


__all__ = [
    "ConfigError", "TrainConfig", "validate_config", "choose_preset", "preset_reason", "apply_overrides", "config_to_dict", "config_from_dict",
    "parse_overrides", "build_config", "HOW_IT_RUNS", "flatten_config", "setting_differences",
    "unrecorded_values",
]
