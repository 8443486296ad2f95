"""Top-k SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), BatchTopK optional.

    pre_NF = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F
    z_NF   = ReLU(TopK_k(pre_NF))            (BatchTopK: the k*N largest over the whole batch)
    x_hat  = z_NF @ W_dec_FD + b_dec_D

Why these choices (all from the paper unless noted):
* top-k fixes L0 directly, so there is no sparsity coefficient to tune and no shrinkage;
* tied init (W_enc = W_dec^T) and unit-norm decoder rows, kept by projecting out the gradient
  component parallel to each row before the step and renormalising after it;
* b_dec starts at the geometric median of the data (robust to outlier activations);
* AuxK: dead latents (no firing for `dead_tokens_threshold` tokens) are asked to reconstruct the
  residual with their own top-`aux_k`, which gives them gradient again;
* training runs through `kernels.sparse.sparse_encode/decode`: the encoder product is the only dense op.
* optional (off by default, issue 16): `sim_coef` adds `similarity_loss`, which keeps the batch's cosine
  similarities for retrieval; on MiniLM embeddings it cost FVU without raising recall@10 (README).

Parameters use SAELens names and shapes, so `save_sae` writes a folder SAELens-style tools read.
Training-only state (`tokens_since_fired`) is a non-persistent buffer: the trainer's checkpoint
(which saves every named buffer) keeps it, the exported `sae_weights.safetensors` does not.
The SAE does not scale its input: during training the caller feeds `x * input_scale`;
`folded_copy()` returns the SAE for raw activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.config import param
from saekit.errors import ConfigError
from saekit.sae.base import (ForwardOutput, LossOutput, SAEConfig, SparseAutoencoder, SparseCode,
                             remove_parallel_grad_, renormalise_rows_, tied_init)
from saekit.sae.kernels import native, triton_topk
from saekit.sae.kernels.sparse import (Select, compute_dtype, rowwise_topk, serial, sparse_decode, sparse_encode,
                                      squared_error_sum)
from saekit.sae.registry import register


@dataclass
class TopKConfig(SAEConfig):
    k: int = param(32, "active latents per row (BatchTopK: on average per row)", ge=1)
    batch_topk: bool = param(False, "BatchTopK: keep the k*B largest activations of a training batch; inference "
                                    "uses a threshold learned as an EMA of the smallest kept activation")
    threshold_momentum: float = param(0.99, "EMA momentum of the BatchTopK inference threshold", ge=0.0, lt=1.0)
    aux_k: int | None = param(None, "latents in the AuxK reconstruction; None = d_in // 2 (Gao et al. use 512)", ge=1)
    aux_coef: float = param(1 / 32, "weight of the AuxK loss (0 disables it)", ge=0.0)
    dead_tokens_threshold: int = param(1_000_000, "tokens without firing after which a latent counts as dead "
                                                  "(Gao et al. use 10M on far longer runs)", ge=1)
    apply_b_dec_to_input: bool = param(True, "subtract b_dec from the input before encoding")
    sim_coef: float = param(0.0, "weight of the retrieval-aware loss that keeps the batch's cosine similarities "
                                 "(0 disables it; scaled by the batch's mean squared row norm, so it is "
                                 "comparable to the mse whatever the input scale)", ge=0.0)
    sim_loss: str = param("kl", "retrieval-aware loss: 'kl' between each row's softmax(cos / sim_temperature) "
                                "neighbour distributions of the input and the reconstruction (weights near "
                                "neighbours), or 'mse' between the two cosine matrices", choices=["kl", "mse"])
    sim_temperature: float = param(0.05, "temperature of the 'kl' similarity loss", gt=0.0)

    def validate(self) -> None:
        if self.k > self.d_sae:
            raise ConfigError(f"topk: expected k <= d_sae={self.d_sae}, found k={self.k}")

    @property
    def resolved_aux_k(self) -> int:
        return min(self.aux_k or max(self.d_in // 2, 1), self.d_sae)


@register
class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    config_class = TopKConfig
    decoder_is_affine = True
    stat_buffers = {"tokens_since_fired": "fired_any", "threshold": "min"}

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.cfg: TopKConfig = cfg
        self.W_enc, self.W_dec, self.b_enc, self.b_dec = tied_init(cfg)
        if cfg.batch_topk:  # < 0: not estimated yet (inference then falls back to row-wise top-k)
            self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=cfg.device))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=cfg.device),
                             persistent=False)
        self._workspace: Tensor | None = None  # reused [N, d_sae] pre-activation buffer (training only)

    # -- encoding --------------------------------------------------------------------------------
    def _select(self, dead_idx: Tensor | None, widths: dict) -> Select:
        k, cfg = self.cfg.k, self.cfg
        batch_mode = cfg.batch_topk and self.training
        threshold = float(self.threshold) if cfg.batch_topk and not self.training else -1.0

        def with_aux(idx_NK: Tensor, vals_NK: Tensor, dead_cols) -> tuple[Tensor, Tensor]:
            """Appends the AuxK selection; `dead_cols(idx_A)` gives those latents' pre-activations [N, A]."""
            widths["main"] = idx_NK.shape[1]
            if dead_idx is None:
                return idx_NK, vals_NK
            aux_vals, aux_pos = dead_cols(dead_idx).topk(min(cfg.resolved_aux_k, dead_idx.numel()), dim=1, sorted=False)
            return torch.cat([idx_NK, dead_idx[aux_pos]], 1), torch.cat([vals_NK, aux_vals.clamp_min_(0)], 1)

        def select(pre_NF: Tensor, b_F: Tensor | None = None) -> tuple[Tensor, Tensor]:
            if b_F is not None and (batch_mode or threshold >= 0):
                pre_NF = pre_NF.add_(b_F)  # the native row-wise top-k adds the bias itself; these do not
                b_F = None
            if batch_mode:
                idx_NK, vals_NK = batch_topk(pre_NF, k * pre_NF.shape[0])
            elif threshold >= 0:
                idx_NK, vals_NK = _threshold_select(pre_NF, threshold)
            else:
                vals_NK, idx_NK = rowwise_topk(pre_NF, k, b_F)
                with serial():
                    vals_NK.clamp_min_(0)  # ReLU on k values, not on the [N, F] block

            def dead_cols(d_A: Tensor) -> Tensor:
                dead_NA = pre_NF.index_select(1, d_A)
                return dead_NA.add_(b_F[d_A]) if b_F is not None else dead_NA
            return with_aux(idx_NK, vals_NK, dead_cols)

        def finish(idx_NK: Tensor, vals_NK: Tensor, cols) -> tuple[Tensor, Tensor]:
            """After an exact row-wise top-k computed without the dense block (`kernels.native_filter`)."""
            with serial():
                vals_NK.clamp_min_(0)
            return with_aux(idx_NK, vals_NK, cols)
        select.adds_bias = True  # called as select(pre without bias, b_enc) (see kernels.sparse.SparseEncode)
        select.rowwise_k = None if batch_mode or threshold >= 0 else k  # may skip the dense block: finish()
        select.finish = finish
        return select

    def _encode_parts(self, x_ND: Tensor, with_aux: bool) -> tuple[SparseCode, SparseCode | None]:
        dead_idx = None
        if with_aux:
            dead = (self.tokens_since_fired >= self.cfg.dead_tokens_threshold).nonzero().flatten()
            dead_idx = dead if dead.numel() else None
        widths: dict = {}
        if not self.cfg.batch_topk and triton_topk.applies(x_ND, self.cfg.k):  # CUDA: product + top-k fused (Triton)
            b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
            (v, i), aux = triton_topk.encode_with_aux(x_ND, self.W_enc, self.b_enc, b_dec, self.cfg.k, dead_idx,
                                                      self.cfg.resolved_aux_k)
            return SparseCode(i, v, self.cfg.d_sae), aux and SparseCode(aux[1], aux[0], self.cfg.d_sae)
        out = None
        if self.training and torch.is_grad_enabled():  # under autocast the workspace has the autocast dtype
            n, dtype = x_ND.shape[0] * self.cfg.d_sae, compute_dtype(x_ND.device) or self.W_enc.dtype
            ws = self._workspace  # a plain attribute: reallocated when the size, dtype or device changes
            if ws is None or ws.numel() != n or ws.dtype != dtype or ws.device != self.W_enc.device:
                self._workspace = torch.empty(n, dtype=dtype, device=self.W_enc.device)
            out = self._workspace.view(x_ND.shape[0], self.cfg.d_sae)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        vals, idx = sparse_encode(x_ND, self.W_enc, self.b_enc, b_dec, self._select(dead_idx, widths), out)
        m = widths["main"]
        if dead_idx is None:
            return SparseCode(idx, vals, self.cfg.d_sae), None
        main = SparseCode(idx[:, :m].contiguous(), vals[:, :m], self.cfg.d_sae)
        aux = SparseCode(idx[:, m:].contiguous(), vals[:, m:], self.cfg.d_sae)
        return main, aux

    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        return self._encode_parts(x_ND, with_aux=False)[0]

    def _decode_flat(self, code: SparseCode) -> Tensor:
        return sparse_decode(code.values, code.indices, self.W_dec, self.b_dec)

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        train = self.training
        code, aux_code = self._encode_parts(x_ND, with_aux=train and self.cfg.aux_coef > 0)
        recon = self._decode_flat(code)
        aux = {}
        if aux_code is not None:  # AuxK reconstructs the residual without the bias
            aux["auxk_recon"] = sparse_decode(aux_code.values, aux_code.indices, self.W_dec, None)
        if train:
            with serial():
                self._update_stats(code, x_ND.shape[0])
        return ForwardOutput(recon, code, aux)

    @torch.no_grad()
    def _update_stats(self, code: SparseCode, n_tokens: int) -> None:
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=code.indices.device)
        fired[code.indices[code.values > 0]] = True
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)
        if self.cfg.batch_topk:  # Bussmann et al.: threshold = running estimate of the smallest kept value
            pos = code.values[code.values > 0]
            if pos.numel():
                m, t = self.cfg.threshold_momentum, pos.min().float()
                self.threshold.copy_(t if self.threshold < 0 else m * self.threshold + (1 - m) * t)

    # -- loss ----------------------------------------------------------------------------------------
    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        """mse = mean over rows of ||x - x_hat||^2; auxk = mean over rows of ||e - e_hat||^2 with
        e = (x - x_hat) detached and e_hat the dead latents' reconstruction; total = mse + aux_coef*auxk
        (+ sim_coef * mean ||x||^2 * similarity_loss when sim_coef > 0)."""
        with serial():
            n_rows = max(x.numel() // self.cfg.d_in, 1)
            mse = squared_error_sum(out.recon, x) / n_rows
            parts = {"mse": mse.item()}
            total = mse
            if "auxk_recon" in out.aux:
                e = (x - out.recon).detach().reshape(-1, self.cfg.d_in)
                auxk = (out.aux["auxk_recon"] - e).pow(2).sum(-1).mean()
                parts["auxk"] = auxk.item()
                total = total + self.cfg.aux_coef * auxk
        if self.cfg.sim_coef > 0:
            x_ND = x.reshape(-1, self.cfg.d_in)
            sim = similarity_loss(x_ND, out.recon.reshape(-1, self.cfg.d_in), self.cfg.sim_loss,
                                  self.cfg.sim_temperature)
            parts["sim"] = sim.item()
            total = total + self.cfg.sim_coef * x_ND.detach().pow(2).sum(-1).mean() * sim
        return LossOutput(total, parts)

    def dead_fraction(self) -> float:
        return (self.tokens_since_fired >= self.cfg.dead_tokens_threshold).float().mean().item()

    # -- training callbacks --------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_ND: Tensor) -> None:
        """b_dec <- geometric median of `x_ND` (Weiszfeld iterations, float64)."""
        x = x_ND.reshape(-1, self.cfg.d_in).double()
        self.b_dec.copy_(geometric_median(x).to(self.b_dec.dtype))

    def before_optimizer_step(self) -> None:
        g = self.W_dec.grad  # the native kernel: one pass over each row instead of three and a temporary
        if g is not None and not native.remove_parallel_rows_(g, self.W_dec.detach()):
            with serial():
                remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        if not native.unit_norm_rows_(self.W_dec.detach()):
            with serial():
                renormalise_rows_(self.W_dec)

    # -- export ----------------------------------------------------------------------------------------
    def _fold_input_scale_(self, s: float) -> None:
        """With x' = s*x: pre' = pre(x)*s, so dividing both biases (and the BatchTopK threshold) by s
        gives codes z/s on raw x and x_hat/s exactly; the top-k set is unchanged (s > 0) and the
        decoder rows stay unit norm."""
        self.b_enc.div_(s)
        self.b_dec.div_(s)
        if self.cfg.batch_topk and float(self.threshold) >= 0:
            self.threshold.div_(s)


def similarity_loss(x_ND: Tensor, recon_ND: Tensor, kind: str = "kl", temperature: float = 0.05) -> Tensor:
    """How differently the reconstructions rank each other than the inputs do, within one batch.

    Why: recall@k of an embedding SAE depends on the *order* of cosine similarities, which the mse
    does not see; two reconstructions with the same error can keep or lose a row's neighbours.
    'kl': mean over rows of KL(p_i || q_i), p_i = softmax_j≠i(cos(x_i, x_j) / T) and q_i the same for
    the reconstructions (a small T weights the nearest neighbours). 'mse': mean squared difference of
    the off-diagonal cosines. Both are 0 when the reconstruction is the input (or a positive multiple)."""
    n = x_ND.shape[0]
    if n < 2:
        return recon_ND.sum() * 0
    xu_ND = x_ND.detach().float()
    xu_ND = xu_ND / xu_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ru_ND = recon_ND.float() / recon_ND.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    S_NN, R_NN = xu_ND @ xu_ND.T, ru_ND @ ru_ND.T
    off_NN = ~torch.eye(n, dtype=torch.bool, device=x_ND.device)
    if kind == "mse":
        return (R_NN - S_NN)[off_NN].pow(2).mean()
    logp_NN = torch.log_softmax((S_NN / temperature).masked_fill(~off_NN, -1e9), dim=-1)
    logq_NN = torch.log_softmax((R_NN / temperature).masked_fill(~off_NN, -1e9), dim=-1)
    terms_NN = logp_NN.exp() * (logp_NN - logq_NN)
    return terms_NN.masked_fill(~off_NN, 0.0).sum(-1).mean()


def geometric_median(x_ND: Tensor, iters: int = 20, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm from the mean: y <- sum_i x_i/|x_i - y| / sum_i 1/|x_i - y|.

    One reused `[N, D]` buffer and a matrix-vector product per iteration (it runs inside `train()`
    before step 1: the broadcast form allocated two `[N, D]` float64 temporaries per iteration)."""
    y = x_ND.mean(0)
    diff_ND = torch.empty_like(x_ND)
    for _ in range(iters):
        w = 1.0 / torch.linalg.vector_norm(torch.sub(x_ND, y, out=diff_ND), dim=1).clamp_min(eps)
        y = (w @ x_ND) / w.sum()
    return y


def _pad_rows(rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """Pack (row, col, value) entries into `[n_rows, width]` index/value tensors, zero-padded."""
    counts = torch.bincount(rows, minlength=n_rows)
    width = max(int(counts.max()) if n_rows else 0, 1)
    order = torch.argsort(rows, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = torch.zeros_like(counts)
    starts[1:] = counts[:-1].cumsum(0)
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    idx_NK = torch.zeros(n_rows, width, dtype=torch.long, device=rows.device)
    vals_NK = torch.zeros(n_rows, width, dtype=vals.dtype, device=vals.device)
    idx_NK[rows, pos] = cols
    vals_NK[rows, pos] = vals
    return idx_NK, vals_NK


def batch_topk(pre_NF: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """The `n_keep` largest pre-activations of the whole batch (ReLU after), packed per row.

    Public because BatchTopK selection is shared: the matryoshka SAE selects each prefix's batch top-k
    with it, so both architectures keep one selection (and its tie and padding rules)."""
    N, F = pre_NF.shape
    vals, flat = pre_NF.reshape(-1).topk(min(n_keep, N * F), sorted=False)
    return _pad_rows(torch.div(flat, F, rounding_mode="floor"), flat % F, vals.clamp_min(0), N)


def _threshold_select(pre_NF: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """BatchTopK inference: every latent whose pre-activation exceeds the threshold (and 0)."""
    active = pre_NF > max(threshold, 0.0)
    width = max(int(active.sum(1).max()) if pre_NF.shape[0] else 0, 1)
    vals, idx = pre_NF.topk(width, dim=1, sorted=False)
    return idx, torch.where(vals > max(threshold, 0.0), vals, torch.zeros_like(vals))
