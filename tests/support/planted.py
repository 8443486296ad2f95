"""Stores with planted massive-activation outliers, written by the writer itself.

`PlantedSource` is `TokenNoiseSource` with the row at position 1 of every `every`-th document
scaled ×`scale` (the first real token, where the main job's SmolLM2 store has its outliers), so the
planted rows are known without asking the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from saekit.sources.base import ActivationBatch
from saekit.store.writer import StoreConfig, cache_activations
from support.runs import WORDS, TokenNoiseSource, llm_spec, synthetic_docs


class PlantedSource(TokenNoiseSource):
    def __init__(self, spec: dict, vocab_size: int, seed: int = 0, every: int = 0, scale: float = 100.0):
        super().__init__(spec, vocab_size, seed)
        self.every, self.scale = every, scale

    def iter_batches(self, docs: list[dict]) -> Iterator[ActivationBatch]:
        for b in super().iter_batches(docs):
            if self.every:
                planted_N = is_planted(b.doc_id, b.pos, self.every)
                b.acts = {h: torch.where(planted_N[:, None], a * self.scale, a) for h, a in b.acts.items()}
            yield b


def is_planted(doc_id_N: torch.Tensor, pos_N: torch.Tensor, every: int) -> torch.Tensor:
    """The planted rows: position 1 of every `every`-th document."""
    return (doc_id_N % every == 0) & (pos_N == 1) if every else torch.zeros(len(doc_id_N), dtype=torch.bool)


def planted_store(root: str | Path, n_docs: int = 120, every: int = 10, d_in: int = 16, model: str = "m",
                  hook: str = "h", docs_per_shard: int = 40, seed: int = 0) -> Path:
    """A store whose position-1 rows of every `every`-th document are ×100 (every=0: no outliers)."""
    source = PlantedSource(llm_spec(model, hook, d_in), len(WORDS) + 2, seed, every=every)
    cache_activations(source, synthetic_docs(n_docs, seed, min_words=4, max_words=10), root,
                      StoreConfig(docs_per_shard=docs_per_shard))
    return Path(root)


def planted_run(run_dir: str | Path, every: int = 4, d_sae: int = 32, k: int = 4, feature: int = 5) -> tuple[Path, int]:
    """A run folder over a planted store whose SAE has one feature (`feature`) aimed at the outliers
    (its top examples are the planted rows), trained-on rows recorded with outliers excluded."""
    from saekit.layout import RunFolder
    from saekit.run.outliers import training_rows, write_training_rows
    from saekit.sae.registry import save_sae
    from saekit.store.reader import ActivationStore
    from support.runs import make_sae

    folder = RunFolder(Path(run_dir))
    store = ActivationStore(planted_store(folder.store, every=every))
    sae = make_sae(store.d_in, d_sae, k, dead=[0], seed=0)
    outliers_ND = store[store.outlier_mask().nonzero().flatten()]
    with torch.no_grad():
        sae.W_enc[:, feature] = 10 * torch.nn.functional.normalize(outliers_ND.mean(0), dim=0)
        sae.b_enc[feature] = 0
    save_sae(sae, folder.final_sae())
    write_training_rows(folder.train_data(), training_rows(store, torch.arange(len(store)), exclude_outliers=True))
    return folder.root, feature
