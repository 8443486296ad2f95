"""Vendored oracle implementations: the plainest dense code of an architecture's maths, kept here so a
refactor of the real one is compared with something it cannot share a bug with (promise 39)."""

from __future__ import annotations

import torch
from torch import nn


class NaiveTopK(nn.Module):
    """Top-k SAE (Gao et al.), dense: ReLU pre-activations, keep the k largest, decode, MSE summed over d_in
    and averaged over rows. Same maths as scripts/bench_train.py's reference."""

    def __init__(self, W_enc, W_dec, b_enc, b_dec, k: int):
        super().__init__()
        self.W_enc, self.W_dec = nn.Parameter(W_enc.clone()), nn.Parameter(W_dec.clone())
        self.b_enc, self.b_dec = nn.Parameter(b_enc.clone()), nn.Parameter(b_dec.clone())
        self.k = k

    def codes(self, x_ND):
        pre_NF = torch.relu((x_ND - self.b_dec) @ self.W_enc + self.b_enc)
        vals, idx = pre_NF.topk(self.k, dim=-1)
        return torch.zeros_like(pre_NF).scatter(-1, idx, vals)

    def forward(self, x_ND):
        return self.codes(x_ND) @ self.W_dec + self.b_dec

    def loss(self, x_ND):
        return (self(x_ND) - x_ND).pow(2).sum(-1).mean()

    def step(self, opt, x_ND) -> None:
        """One Adam step with the decoder rows' gradient projected off the rows and the rows renormalised."""
        loss = self.loss(x_ND)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W = self.W_dec
            W.grad -= (W.grad * W).sum(1, keepdim=True) * W
        opt.step()
        with torch.no_grad():
            W /= W.norm(dim=1, keepdim=True)
