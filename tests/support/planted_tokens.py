"""A run whose SAE has one feature planted on a known token set (for the explanation tests).

The store is written by the writer itself from `TokenNoiseSource` rows (a fixed random vector per
token plus noise), with a planted direction `u` added to the vectors of the planted words; the SAE's
planted feature reads `u` with a bias that only those rows clear, so it fires exactly on the planted
tokens. Token text comes from the tiny GPT-2's word-level tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit.layout import RunFolder
from saekit.store.writer import StoreConfig, cache_activations
from support.runs import WORDS, TokenNoiseSource, llm_spec, make_sae, synthetic_docs, tiny_lm

PLANTED_WORDS = ("cat", "dog")


def planted_token_run(run_dir: str | Path, feature: int = 5, words=PLANTED_WORDS, n_docs: int = 150,
                      d_in: int = 32, d_sae: int = 32, k: int = 4, seed: int = 0) -> Path:
    from saekit.sae.registry import save_sae

    run_dir = Path(run_dir)
    model_dir = tiny_lm(run_dir / "tiny_lm", d_model=d_in)
    source = TokenNoiseSource(llm_spec(str(model_dir), "transformer.h.1", d_in), len(WORDS) + 2, seed)
    u = torch.nn.functional.normalize(torch.randn(d_in, generator=torch.Generator().manual_seed(seed + 1)), dim=0)
    ids = [2 + WORDS.index(w) for w in words]
    source.emb_VD -= (source.emb_VD @ u)[:, None] * u  # no other token leans on u
    source.emb_VD[ids] += 8.0 * u
    cache_activations(source, synthetic_docs(n_docs, seed, min_words=8, max_words=14), RunFolder(run_dir).store,
                      StoreConfig(docs_per_shard=64))
    sae = make_sae(d_in, d_sae, k, [0], seed)
    with torch.no_grad():
        sae.W_enc[:, feature] = 100.0 * u
        sae.b_enc[feature] = -400.0
    save_sae(sae, RunFolder(run_dir).final_sae())
    return run_dir
