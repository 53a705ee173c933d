"""The shared training engine: one trainer, configs and presets, stage folders, EMA, logging, DDP."""

from .config import ConfigError, TrainConfig, apply_overrides, build_config, choose_preset, parse_overrides
from .stage import StageError, StageInfo, is_complete, load_weights, read_stage, save_stage
from .trainer import Trainer

__all__ = [
    "ConfigError", "TrainConfig", "apply_overrides", "build_config", "choose_preset", "parse_overrides",
    "StageError", "StageInfo", "is_complete", "load_weights", "read_stage", "save_stage", "Trainer",
]
