"""Training: the loop, its config, schedules, callbacks and checkpoint/resume."""

from saekit.train.callbacks import Callback, MetricsLogger, ProgressBar, StepInfo
from saekit.train.checkpoint import (
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_sae,
    read_checkpoint,
)
from saekit.train.config import TrainConfig, default_lr
from saekit.train.loop import TrainingInterrupted, TrainResult, TrainRun, train
from saekit.train.schedules import lr_at
from saekit.train.validation import ValidationSet, generalisation_gap

__all__ = ["Callback", "MetricsLogger", "ProgressBar", "StepInfo", "TrainConfig", "TrainResult", "TrainRun",
           "TrainState", "TrainingInterrupted", "ValidationSet", "default_lr", "generalisation_gap", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint_sae", "lr_at", "read_checkpoint", "train"]
