"""Helpers for the trainer tests: a tiny top-k toy SAE with a dead-latent counter, a standard setup,
and a command-line runner that the kill/signal tests start as a subprocess.

    python tests/train_helpers.py '{"run_dir": "...", "kill_at_step": 23, ...}'
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from saekit.config import param
from saekit.data.synthetic import planted_features
from saekit.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder, SparseCode
from saekit.sae.registry import register
from saekit.store.batches import TensorBatches
from saekit.train import Callback, TrainConfig, train

D_IN, D_SAE, K, BATCH = 16, 64, 4, 32


HERE = Path(__file__).resolve().parent


@dataclass
class ToyTopKConfig(SAEConfig):
    k: int = param(4, "active latents per row", ge=1)


@register
class ToyTopK(SparseAutoencoder):
    """Top-k SAE for tests. `tokens_since_fired` is training-only state (a non-persistent buffer);
    `poison = True` makes `before_optimizer_step` write NaN into the encoder gradient."""

    architecture = "test_toy_topk"
    config_class = ToyTopKConfig
    stat_buffers = {"tokens_since_fired": "fired_any"}

    def __init__(self, cfg: ToyTopKConfig):
        super().__init__(cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long), persistent=False)
        self.poison = False

    @property
    def W_dec(self) -> Tensor:  # noqa: N802
        return self.dec

    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        pre = torch.relu((x_ND - self.b_dec) @ self.W_enc + self.b_enc)
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return SparseCode(idx, vals, self.cfg.d_sae)

    def _decode_flat(self, code: SparseCode) -> Tensor:
        return (code.values.unsqueeze(-1) * self.dec[code.indices]).sum(-2) + self.b_dec

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        code = self._encode_flat(x_ND)
        if self.training:
            with torch.no_grad():
                self.tokens_since_fired += x_ND.shape[0]
                self.tokens_since_fired[code.indices[code.values > 0].unique()] = 0
        return ForwardOutput(self._decode_flat(code), code)

    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        self.b_dec.copy_(x_ND.mean(0).to(self.b_dec.dtype))

    def before_optimizer_step(self) -> None:
        if self.poison:
            self.W_enc.grad.fill_(float("nan"))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.dec.div_(self.dec.norm(dim=-1, keepdim=True))

    def folded_copy(self) -> "ToyTopK":
        new = type(self)(self.cfg)
        new.load_state_dict(self.state_dict())
        s = getattr(self, "input_scale", None)
        if s is not None:
            with torch.no_grad():
                new.W_enc.mul_(s)
                new.dec.div_(s)
                new.b_dec.div_(s)
        return new


@register
class OtherToy(ToyTopK):
    """The same maths under another architecture name (for resume-mismatch tests)."""

    architecture = "test_toy_topk_other"


def run_script(spec: dict, timeout: float = 120):
    """Run `main(spec)` in a fresh python process; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, str(HERE / "train_helpers.py"), json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE.parent)


def make_data(n: int = 1024, seed: int = 0) -> Tensor:
    return planted_features(n, D_IN, 32, avg_active=3, seed=seed).x_ND * 3.0


def make_setup(data: Tensor | None = None, sae_overrides: dict | None = None, shuffle: bool = True,
               sae_class: type[SparseAutoencoder] | None = None, arch: str = "toy", **cfg_overrides):
    """(sae, batches, cfg) for a tiny deterministic run; kwargs override TrainConfig fields.

    arch="topk" (or "matryoshka") uses the real top-k SAE with AuxK engaged (a short dead-latent window)."""
    x = make_data() if data is None else data
    sae_cfg = dict(d_in=x.shape[-1], d_sae=D_SAE, k=K)
    if arch in ("topk", "matryoshka"):
        from saekit.sae.registry import get_class

        sae_cfg.update(dead_tokens_threshold=96, aux_k=4)
        sae_cfg.update(sae_overrides or {})
        cls = get_class(arch)
        sae = cls(cls.config_class(**sae_cfg))
    else:
        sae_cfg.update(sae_overrides or {})
        sae = (sae_class or ToyTopK)(ToyTopKConfig(**sae_cfg))
    batches = TensorBatches(x, BATCH, seed=1, shuffle=shuffle)
    cfg = dict(total_steps=40, batch_size=BATCH, lr=3e-3, warmup_steps=5, decay="linear", decay_fraction=0.3,
               checkpoint_every=10, keep_checkpoints=10, log_every=5, normalize_activations="expected_average_only_in",
               norm_batches=2, progress_bar=False)
    cfg.update(cfg_overrides)
    return sae, batches, TrainConfig.from_dict(cfg)


def batch_hash(x: Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16]


class Recorder(Callback):
    """Records (step, batch hash, skipped) and optionally acts at given steps."""

    def __init__(self, actions: dict[int, callable] | None = None):
        self.steps: list[tuple[int, str, bool]] = []
        self.actions = actions or {}

    def on_step_end(self, run, info) -> None:
        self.steps.append((info.step, batch_hash(info.batch_BD), info.skipped))
        if info.step in self.actions:
            self.actions[info.step](run, info)


def main(spec: dict) -> None:
    """Run a training described by `spec` (see the kill/signal tests)."""
    torch.use_deterministic_algorithms(True)
    sae, batches, cfg = make_setup(**spec.get("cfg", {}))
    actions = {}
    if "kill_at_step" in spec:
        actions[spec["kill_at_step"]] = lambda run, info: os.kill(os.getpid(), signal.SIGKILL)
    for step in spec.get("sigint_at_steps", []):
        actions[step] = lambda run, info, n=spec.get("n_signals", 1), s=spec.get("signal", "SIGINT"): [
            os.kill(os.getpid(), getattr(signal, s)) for _ in range(n)]
    if "exit_in" in spec:  # die (like SIGKILL, no cleanup) at the Nth call of a writer the checkpoint uses
        import saekit.train.checkpoint as ck

        name, nth = spec["exit_in"]
        calls = {"n": 0}
        real = getattr(ck, name)

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                os._exit(137)
            return real(*args, **kwargs)

        setattr(ck, name, dying)
    train(sae, batches, cfg, spec["run_dir"], callbacks=[Recorder(actions)], resume=spec.get("resume", False))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    sys.exit(0)

