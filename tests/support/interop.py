"""Stores for the peer-made SAE fixtures (tests/fixtures/interop, d_in 16): bring-your-own-SAE tests.

The fixtures were made by SAELens, dictionary_learning, sparsify and Gemma Scope code on random inputs; most
have random weights, so on arbitrary activations they reconstruct worse than the mean (FVU > 1) and the
preflight rightly refuses them. `fitted_store` writes, through the store writer, a store of activations those
SAEs do read well: each token's vector is fitted (Adam on the summed FVU) so the given SAEs reconstruct it,
plus noise. Its model is a tiny GPT-2 saved in a folder named like the fixtures' model ("toy-model"), and its
hook `transformer.h.1` is the residual stream after layer 1, which the fixtures name
`blocks.1.hook_resid_post` (SAELens) and `resid_post_layer_1` (dictionary_learning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from saekit.layout import RunFolder
from saekit.sources.base import ActivationBatch
from saekit.store.writer import StoreConfig, cache_activations
from support.runs import WORDS, TokenNoiseSource, llm_spec, synthetic_docs, tiny_lm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "interop"
SAELENS_JUMPRELU = FIXTURES / "saelens" / "jumprelu"
DL_BATCHTOPK = FIXTURES / "dictionary_learning" / "batchtopk" / "trainer_0"
GEMMASCOPE = FIXTURES / "gemmascope" / "layer_1_width_32_average_l0_5"
MODEL = "toy-model"
HOOK = "transformer.h.1"
D_IN = 16


def fitted_vectors(saes: list, n: int = len(WORDS) + 2, d_in: int = D_IN, seed: int = 0, steps: int = 100
                   ) -> torch.Tensor:
    """`n` vectors `[n, d_in]` every SAE of `saes` reconstructs well; random ones when `saes` is empty."""
    g = torch.Generator().manual_seed(seed)
    x_ND = (torch.randn(n, d_in, generator=g) * 2).requires_grad_()
    if not saes:
        return x_ND.detach()
    opt = torch.optim.Adam([x_ND], lr=0.1)
    for _ in range(steps):
        loss = sum(_fvu(sae, x_ND) for sae in saes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x_ND.detach()


def _fvu(sae, x_ND: torch.Tensor) -> torch.Tensor:
    recon_ND = sae.eval()(x_ND).recon
    return (x_ND - recon_ND).pow(2).sum() / (x_ND - x_ND.mean(0)).pow(2).sum()


class ScaledSource(TokenNoiseSource):
    """TokenNoiseSource with given token vectors, every row multiplied by `scale` (a store that misses an
    input normalisation the SAE expects, when scale != 1)."""

    def __init__(self, spec: dict, vectors_VD: torch.Tensor, scale: float = 1.0, seed: int = 0):
        super().__init__(spec, vectors_VD.shape[0], seed)
        self.emb_VD, self.scale = vectors_VD, scale

    def iter_batches(self, docs: list[dict]) -> Iterator[ActivationBatch]:
        for b in super().iter_batches(docs):
            yield ActivationBatch(acts={h: a * self.scale for h, a in b.acts.items()}, token_id=b.token_id,
                                  doc_id=b.doc_id, pos=b.pos)


def fitted_store(root: str | Path, vectors_VD: torch.Tensor, model: str = MODEL, hook: str = HOOK,
                 scale: float = 1.0, n_docs: int = 80, seed: int = 0) -> Path:
    """`<root>/store`: a store (written by `cache_activations`) over `synthetic_docs` whose token vectors are
    `vectors_VD` (from `fitted_vectors`), of a tiny GPT-2 saved as `<root>/<model>`; returns the store folder."""
    root = Path(root)
    d_in = vectors_VD.shape[1]
    model_dir = tiny_lm(root / model, d_model=d_in)
    source = ScaledSource(llm_spec(str(model_dir), hook, d_in), vectors_VD, scale, seed)
    store = RunFolder(root).store
    cache_activations(source, synthetic_docs(n_docs, seed), store, StoreConfig(docs_per_shard=64))
    return store
