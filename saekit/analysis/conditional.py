"""Conditional steering: an edit applied only where a detector latent fires.

    with steer_conditional(model, "model.layers.15", sae=sae, detector=812, threshold=2.0,
                           edits=[FeatureEdit(101, "add", alpha=40.0)]) as stats:
        out = model.generate(...)          # positions are chosen token by token as they are generated
    stats.fired, stats.seen                # how many positions were edited, of how many

Why: an always-on edit pushes every token, including the ones the concept has nothing to do with,
and most of the damage (KL on neutral text) comes from those. Gating the edit on a detector latent
of the same SAE ("only where the text already talks about X") keeps the rest of the sequence
untouched. Positions where the detector is silent are returned bitwise unchanged (`torch.where` on
the original tensor), so the no-op part of a conditional steer is exact, not approximately so.
With the KV cache each generated token is its own forward, so the choice is made per token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from saekit.analysis.steering import ActivationEdit, FeatureEdit, add_direction, check_features
from saekit.errors import ConfigError, ShapeMismatchError
from saekit.sae.base import SparseAutoencoder, inference_mode
from saekit.sources.hooks import hook_point


@dataclass
class GateStats:
    """What a conditional steer did: positions it saw and positions it edited (pads included)."""

    seen: int = 0
    fired: int = 0

    @property
    def rate(self) -> float:
        return self.fired / self.seen if self.seen else 0.0


def detector_values(sae: SparseAutoencoder, acts: Tensor, detector: int) -> Tensor:
    """The detector latent's code value at every position (`acts[..., d] -> [...]`), from the sparse code."""
    p = next(sae.parameters())
    with inference_mode(sae):
        code = sae.encode(acts.to(p.device, p.dtype))
    hit = code.indices == detector
    return (code.values * hit).sum(-1).to(acts.device).float()


class _GatedEditor:
    """The hook function: edit where the detector's value exceeds the threshold, leave the rest as is."""

    def __init__(self, sae, detector: int, threshold: float, editor: ActivationEdit, stats: GateStats):
        self.sae, self.detector, self.threshold, self.editor, self.stats = sae, detector, threshold, editor, stats

    def __call__(self, acts: Tensor) -> Tensor:
        gate = detector_values(self.sae, acts, self.detector) > self.threshold
        self.stats.seen += gate.numel()
        n = int(gate.sum())
        self.stats.fired += n
        if n == 0:
            return acts
        return torch.where(gate[..., None], self.editor(acts), acts)


@contextlib.contextmanager
def steer_conditional(model, hook: str, *, sae: SparseAutoencoder, detector: int, threshold: float = 0.0,
                      edits: Sequence[FeatureEdit] = (), vector: Tensor | None = None,
                      alpha: float = 0.0) -> Iterator[GateStats]:
    """Like `steer`, but the edit applies only at positions where latent `detector` of `sae` fires above
    `threshold` (its value in the SAE's code of the unedited activation). Yields the `GateStats`."""
    edits = [e if isinstance(e, FeatureEdit) else FeatureEdit(**e) for e in edits]
    if sae is None:
        raise ConfigError("steer_conditional: expected an SAE holding the detector latent (sae=...), found None")
    check_features(sae, [*edits, FeatureEdit(detector, "ablate")])
    if vector is not None and vector.shape[-1] != sae.cfg.d_in:
        raise ShapeMismatchError(f"steer_conditional: expected vector [d_in={sae.cfg.d_in}], "
                                 f"found {tuple(vector.shape)}")
    stats = GateStats()
    direction_D = add_direction(sae, edits, vector, alpha)
    clamps = [e for e in edits if e.mode != "add"]
    if direction_D is None and not clamps:
        yield stats  # nothing to do: no hook, the model runs bitwise unchanged
        return
    edit = ActivationEdit(sae, direction_D, clamps)
    with hook_point(model, hook, _GatedEditor(sae, int(detector), float(threshold), edit, stats)):
        yield stats
