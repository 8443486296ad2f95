"""The SparseAutoencoder contract every architecture keeps.

An SAE maps activations `x [..., d_in]` to a sparse code over `d_sae` latents and back:

    code  = sae.encode(x)      # SparseCode: indices [..., k], values [..., k]
    x_hat = sae.decode(code)   # [..., d_in]
    out   = sae(x)             # ForwardOutput: recon, code, and whatever the loss needs
    loss  = sae.loss(x, out)   # LossOutput: total + named parts (pure function of its inputs)

No architecture is assumed to have an encoder matrix (matching pursuit has none). Inputs shaped
`(d_in)`, `(B, d_in)` and `(B, T, d_in)` all work: the base flattens leading dimensions, the
architecture sees `[N, d_in]` only (`_encode_flat`, `_decode_flat`, `_forward_flat`).

Architecture policy is declared on the class, and the trainer and evaluators read it instead of
naming architectures: `edits_weights_locally` (weights edited from rank-local data after a step, so
distributed training broadcasts rank 0's copy), `stat_buffers` (which buffers are training
statistics and how ranks combine them), `decoder_is_affine` (decode is `values @ W_dec[idx] + b`,
which the description-length fast path needs) and `supports_folding`. A new architecture is one
file: a config dataclass, a `@register`ed subclass, these declarations where the defaults are wrong.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from saekit.config import Config, param
from saekit.errors import ShapeMismatchError

StatReduction = Literal["fired_any", "min", "mean"]
"""How ranks combine a training statistic buffer after each forward (see `SparseAutoencoder.stat_buffers`)."""

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


NORMALIZE_KEY = "normalize_activations"  # SAELens's cfg.json key; always "none" in what saekit writes


@dataclass
class SAEConfig(Config):
    """Fields every architecture shares; names follow SAELens's cfg.json where they exist."""

    d_in: int = param(doc="width of the activations the SAE reads", ge=1)
    d_sae: int = param(doc="number of latents (dictionary size)", ge=1)
    dtype: str = param("float32", "parameter dtype", choices=list(DTYPES))
    device: str = param("cpu", "device the SAE is created on")
    model_name: str = param("", "model the activations come from (metadata)")
    hook_name: str = param("", "hook point the activations come from (metadata)")
    hook_layer: int = param(-1, "layer index of the hook (metadata; -1 unknown)")
    context_size: int = param(0, "tokens per context when caching (metadata)")
    dataset_path: str = param("", "corpus the SAE was trained on (metadata)")
    seed: int = param(0, "initialisation seed")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class SparseCode:
    """A sparse code: `indices [..., k]` into the d_sae latents and their `values [..., k]`.

    Slots with value 0 are inactive (an index may then be arbitrary). Architectures whose number of
    active latents varies per row (BatchTopK, adaptive MP) pad with zeros.
    """

    indices: Tensor
    values: Tensor
    d_sae: int

    def dense(self) -> Tensor:
        """The dense view `[..., d_sae]` (zeros except the active latents)."""
        out = self.values.new_zeros(*self.values.shape[:-1], self.d_sae)
        return out.scatter_add_(-1, self.indices, self.values)

    def l0(self) -> Tensor:
        """Number of active (non-zero) latents per row, `[...]`."""
        return (self.values != 0).sum(-1)

    def reshape(self, *lead: int) -> "SparseCode":
        k = self.indices.shape[-1]
        return SparseCode(self.indices.reshape(*lead, k), self.values.reshape(*lead, k), self.d_sae)

    def detach(self) -> "SparseCode":
        return SparseCode(self.indices, self.values.detach(), self.d_sae)


@dataclass
class ForwardOutput:
    """What `forward` returns: the reconstruction, the code, and loss ingredients in `aux`."""

    recon: Tensor
    code: SparseCode
    aux: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class LossOutput:
    """A scalar `total` to backpropagate and its named, detached parts for logging."""

    total: Tensor
    parts: dict[str, float] = field(default_factory=dict)


def random_unit_rows(n: int, d: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """`n` random unit-norm directions `[n, d]`, drawn in float64 (the same draw for every dtype)."""
    rows_ND = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (rows_ND / rows_ND.norm(dim=-1, keepdim=True)).to(dtype)


def tied_init(cfg: SAEConfig) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]:
    """`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec` with the tied init of Gao et al.:
    random unit-norm decoder rows, encoder = decoder transposed, zero biases (seeded by cfg.seed)."""
    g = torch.Generator().manual_seed(cfg.seed)
    W_dec_FD = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
    W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
    kw = {"dtype": cfg.torch_dtype, "device": cfg.device}
    return (nn.Parameter(W_dec_FD.T.contiguous().to(**kw)), nn.Parameter(W_dec_FD.to(**kw)),
            nn.Parameter(torch.zeros(cfg.d_sae, **kw)), nn.Parameter(torch.zeros(cfg.d_in, **kw)))


@torch.no_grad()
def remove_parallel_grad_(W_dec_FD: Tensor) -> None:
    """Remove from each decoder row's gradient its component along the (unit) row: the optimizer
    step then turns the direction instead of changing a norm `renormalise_rows_` would undo."""
    g = W_dec_FD.grad
    if g is not None:  # (g * W).sum(1), not einsum("fd,fd->f"), which ran as d_sae tiny bmm's, 2x slower
        g.addcmul_((g * W_dec_FD).sum(1, keepdim=True), W_dec_FD, value=-1)


@torch.no_grad()
def renormalise_rows_(W_dec_FD: Tensor) -> None:
    W_dec_FD.div_(W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))


class SparseAutoencoder(nn.Module):
    """Base class: shape handling, save/load hooks and the training callbacks' defaults."""

    architecture: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    supports_folding: ClassVar[bool] = True
    edits_weights_locally: ClassVar[bool] = False
    """True when `after_optimizer_step` edits weights from this process's own data (MP's dead-atom
    revival): distributed training then broadcasts rank 0's parameters and buffers after every step."""
    stat_buffers: ClassVar[Mapping[str, StatReduction]] = {}
    """Buffers (by `named_buffers()` name) that a training forward updates from its batch, and how
    distributed training makes them global after each forward:
    'fired_any' - a per-latent count of tokens since the latent last fired: 0 where it fired on any
    rank, else its value before the step plus the global number of rows;
    'min' - a float statistic whose global value is the minimum over ranks (BatchTopK's threshold).
    'mean' - a per-batch mean over rows (the MDL controller's batch L0): the row-weighted mean over ranks.
    A declared buffer an instance does not have (a plain top-k has no threshold) is skipped."""
    decoder_is_affine: ClassVar[bool] = False
    """True when `decode(code) == code.values @ W_dec[code.indices] + b` for a fixed `b`: description
    length then quantises through gathered `W_dec` rows instead of one `decode` per precision."""

    W_dec: nn.Parameter
    """Decoder directions `[d_sae, d_in]` (SAELens name); every architecture has a dictionary."""
    decoder_norm_folded: ClassVar[tuple[str, ...]] = ()
    """Per-latent tensors `[d_sae]` that `fold_W_dec_norm` multiplies by the decoder row norms along with
    W_enc's columns (biases, thresholds). Empty: folding would change the computation (a top-k selection,
    a pursuit, a gate on log θ) and `fold_W_dec_norm` raises NotImplementedError."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg

    # -- the public API, any leading shape ------------------------------------------------
    def encode(self, x: Tensor) -> SparseCode:
        x_ND, lead = self._flatten(x)
        return self._encode_flat(x_ND).reshape(*lead)

    def decode(self, code: SparseCode) -> Tensor:
        lead = code.indices.shape[:-1]
        flat = code.reshape(-1)
        return self._decode_flat(flat).reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor) -> ForwardOutput:
        x_ND, lead = self._flatten(x)
        out = self._forward_flat(x_ND)
        return ForwardOutput(out.recon.reshape(*lead, self.cfg.d_in), out.code.reshape(*lead), out.aux)

    # -- what an architecture implements ---------------------------------------------------
    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        raise NotImplementedError

    def _decode_flat(self, code: SparseCode) -> Tensor:
        raise NotImplementedError

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        code = self._encode_flat(x_ND)
        return ForwardOutput(self._decode_flat(code), code)

    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        """Default: mean squared error summed over d_in, averaged over rows."""
        err = (out.recon - x).pow(2).sum(-1).mean()
        return LossOutput(err, {"mse": err.item()})

    # -- training callbacks (no-ops unless an architecture needs them) ----------------------
    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        """Data-dependent initialisation (e.g. decoder bias at the geometric median)."""

    def before_optimizer_step(self) -> None:
        """Called after backward, before the optimizer step (e.g. remove the parallel gradient)."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Called after the optimizer step (e.g. renormalise decoder rows, refresh a Gram matrix)."""

    def dead_fraction(self) -> float | None:
        """Fraction of latents the architecture counts as dead now, or None when it keeps no such
        statistic (the trainer's metrics logger then counts firings in the codes it sees)."""
        return None

    def set_input_scale(self, scale: float) -> None:
        """Training-time input normalisation `x * scale`; the exported copy folds it away."""
        self.register_buffer("input_scale", torch.tensor(float(scale)), persistent=False)

    def folded_copy(self) -> "SparseAutoencoder":
        """A copy that works on raw activations: the training input scale s folded into the weights by
        the architecture's `_fold_input_scale_`. Architectures for which folding is invalid raise
        NotImplementedError."""
        if not self.supports_folding:
            raise NotImplementedError(f"{self.architecture}: folding is not valid for this architecture")
        new = type(self)(self.cfg)
        with torch.no_grad():
            for name, t in itertools.chain(self.named_parameters(), self.named_buffers()):
                if name != "input_scale":
                    getattr(new, name).copy_(t)
            scale = getattr(self, "input_scale", None)
            if scale is not None and float(scale) != 1.0:
                new._fold_input_scale_(float(scale))
        return new.train(self.training)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> "SparseAutoencoder":
        """SAELens's name: decoder rows to unit norm, each row's norm n_j moved into the encoder (W_enc's
        column j and the `decoder_norm_folded` tensors times n_j), in place. Why: with an unconstrained
        decoder (ReLU, loaded files) code magnitudes are only comparable across latents once the norms are
        folded; pre-activations scale by n_j > 0, so ReLU/jump/gate codes come out times n_j and the
        reconstruction is unchanged (a zero row stays zero: its norm is clamped, its codes vanish)."""
        if not self.decoder_norm_folded:
            raise NotImplementedError(f"{self.architecture}: folding decoder norms is not valid for this "
                                      "architecture (it would change which latents are selected)")
        n_F = self.W_dec.norm(dim=1).clamp_min(torch.finfo(self.W_dec.dtype).tiny)
        self.W_enc.mul_(n_F)
        for name in self.decoder_norm_folded:
            getattr(self, name).mul_(n_F)
        self.W_dec.div_(n_F[:, None])
        return self

    def _fold_input_scale_(self, s: float) -> None:
        """Rewrite the weights in place so that on raw x this SAE gives what it gave on `x * s`, divided
        by s (codes and reconstruction alike)."""
        raise NotImplementedError(f"{self.architecture}: no rule for folding an input scale into the weights")

    # -- helpers ---------------------------------------------------------------------------
    def _flatten(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if x.shape[-1] != self.cfg.d_in:
            raise ShapeMismatchError(
                f"{self.architecture}: expected input [..., d_in={self.cfg.d_in}], found shape {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, self.cfg.d_in), lead

    def config_dict(self) -> dict:
        """The cfg.json content: the config plus `architecture` and SAELens's `normalize_activations`.

        Input normalisation is the trainer's alone (`train.normalize_activations`): it scales the
        inputs while training and the saved copy has the scale folded into its weights, so a saved
        saekit SAE always takes raw activations. cfg.json says so in SAELens's terms ('none'), so
        tools that read SAELens folders do not rescale inputs a second time."""
        d = self.cfg.to_dict(redact=True)
        d["architecture"] = self.architecture
        d[NORMALIZE_KEY] = "none"
        return d


@contextlib.contextmanager
def inference_mode(sae: SparseAutoencoder) -> Iterator[SparseAutoencoder]:
    """The SAE in eval mode (BatchTopK uses its inference threshold) under `torch.no_grad`, its
    previous mode restored after. Why no_grad and not `torch.inference_mode`: tensors made inside the
    latter can never enter autograd, and callers keep codes and reconstructions around."""
    was = sae.training
    sae.eval()
    try:
        with torch.no_grad():
            yield sae
    finally:
        sae.train(was)
