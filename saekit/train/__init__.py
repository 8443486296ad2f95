"""Training: the loop, its config, schedules, callbacks and checkpoint/resume."""

import sys
import types

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

__all__ = ["Callback", "MetricsLogger", "ProgressBar", "StepInfo", "TrainConfig", "TrainResult", "TrainRun",
           "TrainState", "TrainingInterrupted", "default_lr", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint_sae", "lr_at", "read_checkpoint", "train"]


class _CallableModule(types.ModuleType):
    """`saekit.train(sae, batches, cfg, run_dir)` is the documented entry point, but once anything imports
    this package Python binds `saekit.train` to the package, not the function; calling the package calls
    `train` so both spellings keep working (without it: "TypeError: 'module' object is not callable")."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
