"""TrainConfig: everything the training loop needs besides the SAE and the data.

Strict like every saekit config: unknown keys and out-of-range values raise `ConfigError`.
`resolved(d_sae)` fills the derived values (total steps from tokens, the width-scaled default
learning rate) so the run folder records the numbers that were actually used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from saekit.config import Config, param
from saekit.errors import ConfigError

# Fields that must agree between a checkpoint and the run resuming it (bit-exact resume).
RESUME_KEYS = ("total_steps", "batch_size", "lr", "beta1", "beta2", "eps", "warmup_steps", "decay",
               "decay_fraction", "grad_clip", "normalize_activations", "norm_batches", "init_batches", "seed")
# Fields that must also agree when the run selects its best checkpoint on validation FVU (the
# evaluation steps and the sample decide which checkpoint wins); a checkpoint written before a field
# existed holds the field's default.
SELECTION_KEYS = ("eval_every", "val_rows", "select_best", "early_stop_patience")


def default_lr(d_sae: int) -> float:
    """Width-scaled Adam learning rate of Gao et al. (2024): 2e-4 / sqrt(d_sae / 16384)."""
    return 2e-4 / math.sqrt(d_sae / 16384)


@dataclass
class TrainConfig(Config):
    """How an SAE is trained: length, optimiser, schedule, checkpoints, logging and fault policy."""

    total_steps: int | None = param(None, "optimizer steps to run (one batch each); give this or total_tokens", ge=1)
    total_tokens: int | None = param(None, "activation rows to train on; total_steps = ceil(total_tokens / batch_size)",
                                     ge=1)
    batch_size: int = param(4096, "rows per batch; must match the batch source", ge=1)
    lr: float | None = param(None, "Adam learning rate; None = 2e-4 / sqrt(d_sae / 16384) (Gao et al.)", gt=0)
    beta1: float = param(0.9, "Adam beta1", ge=0, lt=1)
    beta2: float = param(0.999, "Adam beta2", ge=0, lt=1)
    eps: float = param(6.25e-10, "Adam epsilon (Gao et al. use 6.25e-10)", gt=0)
    warmup_steps: int = param(0, "linear learning-rate warm-up from lr/warmup_steps to lr", ge=0)
    decay: str = param("linear", "learning-rate decay to 0 over the last decay_fraction of training",
                       choices=["none", "linear", "cosine"])
    decay_fraction: float = param(0.2, "fraction of the total steps over which lr decays (end of training)", ge=0, le=1)
    grad_clip: float | None = param(1.0, "clip the global gradient norm to this value; None disables clipping", gt=0)
    checkpoint_every: int = param(1000, "write a checkpoint every this many steps (0: only at the end)", ge=0)
    keep_checkpoints: int = param(3, "how many of the most recent checkpoints to keep", ge=1)
    log_every: int = param(100, "append a metrics.jsonl line every this many steps", ge=1)
    seed: int = param(0, "seed of torch's global RNG at the start of a fresh run")
    nonfinite: str = param("raise", "on NaN/inf activations, loss or gradients: raise NonFiniteError, or skip the "
                                    "batch (parameters and optimizer state untouched)", choices=["raise", "skip"])
    max_consecutive_nonfinite: int = param(10, "with nonfinite='skip', abort after this many non-finite steps in a row",
                                           ge=1)
    deterministic: bool = param(True, "torch.use_deterministic_algorithms(True) while training (bit-exact resume)")
    normalize_activations: str = param(
        "none", "'expected_average_only_in': scale inputs so their mean squared norm is d_in; the scale is "
                "estimated from the first norm_batches batches, stored, and folded into the exported SAE",
        choices=["none", "expected_average_only_in"])
    norm_batches: int = param(8, "batches read to estimate the normalisation scale (fresh runs only)", ge=1)
    init_batches: int = param(1, "batches given to sae.init_from_data on a fresh run (read before training; "
                                 "shared with the normalisation estimate)", ge=1)
    progress_bar: bool = param(True, "show a tqdm progress bar")
    precision: str = param("fp32", "SAE forward precision: fp32, bf16 (autocast; parameters and Adam state stay "
                                   "fp32), or auto (bf16 on GPUs and on CPUs with bf16 instructions)",
                           choices=["fp32", "bf16", "auto"])
    eval_every: int = param(500, "measure validation FVU, L0 and dead fraction on the held-out sample every this many "
                                 "steps and at the last step (0: never; needs val_batches)", ge=0)
    val_rows: int = param(4096, "rows of the fixed validation sample (evenly spaced over the held-out rows)", ge=2)
    select_best: bool = param(False, "export the checkpoint with the lowest validation FVU as final_sae instead of "
                                     "the last one (off by default: the last step is what a resumed run reproduces "
                                     "without validation)")
    early_stop_patience: int = param(0, "stop after this many evaluations without a new best validation FVU, and "
                                        "export the best (implies select_best; 0: never stop early)", ge=0)
    max_epochs_warning: float = param(20, "warn when the run will pass over its training rows more than this many "
                                          "times (0: never warn)", ge=0)

    def validate(self) -> None:
        if (self.total_steps is None) == (self.total_tokens is None):
            raise ConfigError("TrainConfig: give exactly one of total_steps and total_tokens "
                              f"(found total_steps={self.total_steps}, total_tokens={self.total_tokens})")
        if self.selects_best and self.eval_every == 0:
            raise ConfigError("TrainConfig: select_best / early_stop_patience choose among validation evaluations; "
                              "expected eval_every >= 1, found eval_every=0")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def selects_best(self) -> bool:
        """Whether the exported SAE is the best-validation checkpoint (select_best or early stopping)."""
        return self.select_best or self.early_stop_patience > 0

    @property
    def steps(self) -> int:
        """The number of optimizer steps the run makes."""
        if self.total_steps is not None:
            return self.total_steps
        return math.ceil(self.total_tokens / self.batch_size)

    def resolved(self, d_sae: int) -> "TrainConfig":
        """A copy with total_steps and lr filled in (what the run folder records)."""
        return dataclasses.replace(self, total_steps=self.steps, total_tokens=None,
                                   lr=self.lr if self.lr is not None else default_lr(d_sae))
