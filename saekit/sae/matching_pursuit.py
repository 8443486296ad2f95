"""MP-SAE: a sparse autoencoder whose encoder is matching pursuit over its own dictionary.

Costa et al. 2025 ("From Flat to Hierarchical") unroll matching pursuit as the encoder: starting
from `r_0 = x - b_dec`, each step picks the unit-norm atom most correlated with the residual,
takes `alpha = <r, d_j>` and subtracts `alpha * d_j`. Because every step sees what earlier steps
left over, MP captures conditionally orthogonal (hierarchical) features that a one-shot linear
encoder cannot, and the number of steps can change at inference (adaptive sparsity).

There is no encoder matrix: the only weights are `W_dec [d_sae, d_in]` and `b_dec [d_in]`
(SAELens names). Selection runs without gradient through the Gram matrix of the dictionary
(see `kernels.mp`), then the coefficients are recomputed differentiably from the selected atoms
only, which gives the same values and gradients as the naive unrolled pursuit.

Sparsity at inference: `sae.encode(x, k=8)`, `sae.encode(x, stop_mode="threshold",
residual_threshold=0.1)`, `sae.with_sparsity(k=8)` (a view sharing the weights), or set
`sae.cfg.k` directly; every call reads the config afresh.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.config import param
from saekit.errors import ConfigError
from saekit.sae.base import ForwardOutput, LossOutput, SAEConfig, SparseAutoencoder, SparseCode, random_unit_rows
from saekit.sae.kernels.mp import (PursuitOptions, Selection, gram_matrix, merge_duplicates, mp_coefficients,
                                   select_atoms, sparse_decode)
from saekit.sae.registry import register

_OPTION_FIELDS = ("k", "stop_mode", "max_iters", "residual_threshold", "relative_threshold",
                  "stop_on_duplicate_support", "nonneg")


@dataclass
class MPConfig(SAEConfig):
    """Matching-pursuit SAE. The sparsity fields (k, stop_mode, ...) may change at inference."""

    k: int = param(32, "pursuit steps in 'fixed' mode (the L0 budget; SAELens name)", ge=1)
    stop_mode: str = param("fixed", "'fixed': exactly k steps; 'threshold': stop a row when its residual norm "
                           "is below residual_threshold or its selected set stops changing",
                           choices=["fixed", "threshold"])
    max_iters: int = param(0, "hard bound on pursuit steps in either mode; 0 means k", ge=0)
    residual_threshold: float = param(0.0, "'threshold' mode: stop when ||residual|| < this", ge=0.0)
    relative_threshold: bool = param(False, "measure residual_threshold relative to ||x - b_dec||")
    stop_on_duplicate_support: bool = param(True, "'threshold' mode: stop a row when it re-selects an atom")
    nonneg: bool = param(True, "non-negative coefficients (pick the largest correlation, clip at 0); "
                         "False picks the largest |correlation| with a signed coefficient")
    use_decoder_bias: bool = param(True, "learn b_dec (subtracted before the pursuit, added to the output)")
    atom_dropout: float = param(0.0, "training only: probability of hiding each atom from one batch's pursuit",
                                ge=0.0, lt=1.0)
    revive_after_tokens: int = param(0, "an atom unselected for this many training tokens is dead and is pulled "
                                     "toward the residual of a badly reconstructed row; 0 disables", ge=0)
    revive_strength: float = param(1.0, "how far a dead atom moves toward its residual direction (1 = replaced)",
                                   gt=0.0, le=1.0)
    gram: str = param("auto", "selection through the Gram matrix: 'auto' (when it fits in gram_max_mb and pays "
                      "off), 'always', 'never'", choices=["auto", "always", "never"])
    gram_max_mb: float = param(4096.0, "largest Gram matrix (d_sae^2 floats) 'auto' will build", gt=0.0)

    def validate(self) -> None:
        if self.max_iters and self.stop_mode == "fixed" and self.k > self.max_iters:
            raise ConfigError(f"sae[mp]: k={self.k} exceeds max_iters={self.max_iters} in 'fixed' mode; "
                              "raise max_iters or lower k")

    @property
    def steps(self) -> int:
        """Pursuit steps to run: k in 'fixed' mode, the max_iters bound (default k) in 'threshold' mode."""
        if self.stop_mode == "fixed":
            return self.k
        return self.max_iters or self.k


@register
class MatchingPursuitSAE(SparseAutoencoder):
    """Matching-pursuit SAE (architecture "mp"); see the module docstring."""

    architecture = "mp"
    config_class = MPConfig
    supports_folding = False
    edits_weights_locally = True  # dead-atom revival pulls atoms toward this process's residuals
    stat_buffers = {"tokens_since_fired": "fired_any"}
    decoder_is_affine = True  # sum_t vals_t * W_dec[idx_t] + b_dec
    cfg: MPConfig

    def __init__(self, cfg: MPConfig):
        super().__init__(cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        W_FD = random_unit_rows(cfg.d_sae, cfg.d_in, gen, cfg.torch_dtype)
        self.register_parameter("W_dec", nn.Parameter(W_FD.to(cfg.device)))
        if cfg.use_decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=cfg.torch_dtype, device=cfg.device))
        else:
            self.b_dec = None
        # Training-only (non-persistent): the trainer's checkpoint saves every named buffer, the
        # exported weights file does not carry it.
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=cfg.device),
                             persistent=False)
        self._gram_cache: dict = {}  # shared with with_sparsity() views
        self._revive_pool: Tensor | None = None

    # -- sparsity at inference -------------------------------------------------------------
    def with_sparsity(self, **changes) -> "MatchingPursuitSAE":
        """A view with other sparsity settings (k, stop_mode, ...) sharing this SAE's weights."""
        bad = sorted(set(changes) - set(_OPTION_FIELDS))
        if bad:
            raise ConfigError(f"sae[mp]: with_sparsity got {bad}; it changes only {list(_OPTION_FIELDS)}")
        cfg = dataclasses.replace(self.cfg, **changes)
        cfg.validate()
        view = copy.copy(self)
        view.cfg = cfg
        return view

    def pursuit_options(self, **changes) -> PursuitOptions:
        """The pursuit settings for one call: the config, with `changes` (k=..., stop_mode=...) on top."""
        cfg = self.with_sparsity(**changes).cfg if changes else self.cfg
        return PursuitOptions(mode=cfg.stop_mode, steps=cfg.steps, threshold=cfg.residual_threshold,
                              relative=cfg.relative_threshold, stop_on_duplicate=cfg.stop_on_duplicate_support,
                              nonneg=cfg.nonneg)

    def encode(self, x: Tensor, **sparsity) -> SparseCode:
        """Sparse code of `x [..., d_in]`; keyword overrides (k=8, stop_mode='threshold', ...) apply once."""
        if sparsity:
            return self.with_sparsity(**sparsity).encode(x)
        return super().encode(x)

    def forward(self, x: Tensor, **sparsity) -> ForwardOutput:
        if sparsity:
            return self.with_sparsity(**sparsity).forward(x)
        return super().forward(x)

    # -- the contract ----------------------------------------------------------------------
    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        return self._pursue(x_ND)[0]

    def _decode_flat(self, code: SparseCode) -> Tensor:
        recon_ND = sparse_decode(code.indices, code.values, self.W_dec)
        return recon_ND + self.b_dec if self.b_dec is not None else recon_ND

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        code, xc_ND = self._pursue(x_ND)
        recon_ND = self._decode_flat(code)
        aux = l0_stats(code)
        if self.training:
            self._track_usage(code, xc_ND, recon_ND)
        return ForwardOutput(recon_ND, code, aux)

    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        """Mean squared error summed over d_in; L0 statistics ride along for logging."""
        base = super().loss(x, out)
        base.parts.update({k: float(v) for k, v in out.aux.items() if k.startswith("l0_")})
        return base

    def _pursue(self, x_ND: Tensor) -> tuple[SparseCode, Tensor]:
        """Select atoms without gradient, then recompute their coefficients differentiably."""
        opts = self.pursuit_options()
        W_FD = self.W_dec
        x_ND = x_ND.to(W_FD.dtype)
        xc_ND = x_ND - self.b_dec if self.b_dec is not None else x_ND
        sel = self._select(xc_ND, opts)
        alpha_NK = mp_coefficients(xc_ND, W_FD, sel)
        idx_NK, vals_NK = merge_duplicates(sel.idx_NK, alpha_NK, trim=opts.mode == "threshold")
        return SparseCode(idx_NK, vals_NK, self.cfg.d_sae), xc_ND

    @torch.no_grad()
    def _select(self, xc_ND: Tensor, opts: PursuitOptions) -> Selection:
        W_FD = self.W_dec.detach()
        sel_dtype = W_FD.dtype if W_FD.dtype in (torch.float32, torch.float64) else torch.float32
        keep_F = None
        if self.training and self.cfg.atom_dropout > 0:
            keep_F = torch.rand(self.cfg.d_sae, device=W_FD.device) >= self.cfg.atom_dropout
        G_FF = self._gram(rows=xc_ND.shape[0] * opts.steps)
        return select_atoms(xc_ND.detach().to(sel_dtype), W_FD.to(sel_dtype), opts, G_FF, keep_F)

    # -- the Gram matrix -------------------------------------------------------------------
    def _gram_key(self) -> tuple:
        W = self.W_dec
        return (W.data_ptr(), W._version, W.dtype, W.device, tuple(W.shape))

    def _gram(self, rows: int) -> Tensor | None:
        """The cached Gram matrix, rebuilt whenever the dictionary changed (tracked by tensor version).

        'auto' builds it only when it fits in gram_max_mb and the call needs at least d_sae
        row-steps (below that, a product per step is cheaper than d_sae^2 * d_in for the Gram).
        """
        policy = self.cfg.gram
        if policy == "never":
            return None
        fresh = self._gram_cache.get("key") == self._gram_key()
        if fresh:
            return self._gram_cache["G"]
        if policy == "auto":
            too_big = self.cfg.d_sae ** 2 * 4 > self.cfg.gram_max_mb * 2 ** 20
            if too_big or rows < self.cfg.d_sae:
                return None
        return self.refresh_gram()

    @torch.no_grad()
    def refresh_gram(self) -> Tensor:
        """Recompute and cache `W_dec @ W_dec.T` (selection precision: fp32, or fp64 for fp64 weights).

        The old matrix is overwritten in place when it fits, unless it was made under
        `torch.inference_mode` and this call is not (an inference tensor is read-only outside it).
        """
        W_FD = self.W_dec.detach()
        if W_FD.dtype not in (torch.float32, torch.float64):
            W_FD = W_FD.float()
        old = self._gram_cache.get("G")
        reuse = old is not None and old.shape == (W_FD.shape[0],) * 2 and old.dtype == W_FD.dtype \
            and old.device == W_FD.device and (torch.is_inference_mode_enabled() or not old.is_inference())
        self._gram_cache.clear()  # the cache never holds a stale matrix, even if the product fails
        self._gram_cache.update(G=gram_matrix(W_FD, out_FF=old if reuse else None), key=self._gram_key())
        return self._gram_cache["G"]

    # -- training callbacks ----------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        """b_dec at the data mean, so the pursuit starts from centred activations."""
        if self.b_dec is not None:
            self.b_dec.copy_(x_ND.reshape(-1, self.cfg.d_in).to(self.b_dec.dtype).mean(0))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Drop the gradient component along each atom: atoms stay unit norm, so it only rescales."""
        W, g = self.W_dec, self.W_dec.grad
        if g is not None:
            g.sub_((g * W).sum(-1, keepdim=True) * W)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise atoms, revive dead ones, refresh the Gram matrix for the next pursuit."""
        W = self.W_dec
        W.div_(W.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self._revive_dead()
        if self.cfg.gram != "never":
            self.refresh_gram()

    def dead_fraction(self) -> float | None:
        """Fraction of atoms not selected for revive_after_tokens tokens; None when revival is off
        (the usage counter is not kept then, so the trainer's logger counts firings instead)."""
        if not self.cfg.revive_after_tokens:
            return None
        return (self.tokens_since_fired >= self.cfg.revive_after_tokens).float().mean().item()

    def _track_usage(self, code: SparseCode, xc_ND: Tensor, recon_ND: Tensor) -> None:
        """Count tokens since each atom fired; keep the worst residuals when some atom is dead."""
        if not self.cfg.revive_after_tokens:
            return
        with torch.no_grad():
            fired = code.indices[code.values != 0]
            self.tokens_since_fired += xc_ND.shape[0]
            self.tokens_since_fired[fired] = 0
            n_dead = int((self.tokens_since_fired >= self.cfg.revive_after_tokens).sum())
            if n_dead == 0:
                return
            base = self.b_dec if self.b_dec is not None else 0
            resid_ND = xc_ND.detach() - (recon_ND.detach() - base)
            worst = resid_ND.norm(dim=-1).topk(min(n_dead, xc_ND.shape[0])).indices
            self._revive_pool = resid_ND[worst]

    def _revive_dead(self) -> None:
        """Pull the longest-dead atoms toward distinct badly reconstructed residual directions.

        Why residuals: under MP an atom only fires if it wins a correlation with some residual; an
        atom aligned with what the current dictionary leaves unexplained will win on those rows.
        """
        pool, self._revive_pool = self._revive_pool, None
        if pool is None:
            return
        since = self.tokens_since_fired
        dead = (since >= self.cfg.revive_after_tokens).nonzero()[:, 0]
        dead = dead[since[dead].argsort(descending=True)][: pool.shape[0]]
        target_RD = pool[: dead.numel()]
        target_RD = target_RD / target_RD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        eta = self.cfg.revive_strength
        new_RD = (1 - eta) * self.W_dec[dead] + eta * target_RD.to(self.W_dec.dtype)
        self.W_dec[dead] = new_RD / new_RD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        since[dead] = 0

    def folded_copy(self) -> "SparseAutoencoder":
        raise NotImplementedError(
            "mp: folding is not valid for matching pursuit: atoms must stay unit norm because the pursuit "
            "selects by raw correlation, so folding decoder norms (or a scale) into the weights would change "
            "which atoms are picked. Use the SAE as trained; save_sae stores it unfolded.")


def l0_stats(code: SparseCode) -> dict[str, Tensor]:
    """Mean, min and max number of active latents per row (adaptive mode varies by row)."""
    l0_N = code.l0().reshape(-1).float()
    if l0_N.numel() == 0:
        zero = torch.zeros(())
        return {"l0_mean": zero, "l0_min": zero, "l0_max": zero}
    return {"l0_mean": l0_N.mean(), "l0_min": l0_N.min(), "l0_max": l0_N.max()}
