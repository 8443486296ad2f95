"""Text-embedding source: one pooled sentence-transformers vector per document (pos = token_id = -1)."""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from saekit.sources.base import ActivationBatch, SourceConfig
from saekit.sources.models import embedder_hub_id, load_embedder
from saekit.sources.precision import forward_context, resolve_forward_dtype

EMBEDDING_HOOK = "sentence_embedding"
log = logging.getLogger(__name__)


class EmbeddingSource:
    def __init__(self, cfg: SourceConfig, model=None):
        self.cfg = cfg
        self.model = model if model is not None else load_embedder(cfg.model, cfg.device, cfg.revision)
        self.hooks = [EMBEDDING_HOOK]
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.d_in = {EMBEDDING_HOOK: int(dim())}

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        with forward_context(self.cfg.forward_dtype, self.cfg.device):
            out = self.model.encode(texts, batch_size=self.cfg.batch_size, convert_to_tensor=True,
                                    show_progress_bar=False)
        return out.float().cpu()

    def iter_batches(self, docs: list[dict]) -> Iterator[ActivationBatch]:
        for i in range(0, len(docs), self.cfg.batch_size):
            chunk = docs[i: i + self.cfg.batch_size]
            n = len(chunk)
            yield ActivationBatch(
                acts={EMBEDDING_HOOK: self.embed([d["text"] for d in chunk])},
                doc_id=torch.tensor([d["doc_id"] for d in chunk], dtype=torch.int64),
                pos=torch.full((n,), -1, dtype=torch.int32),
                token_id=torch.full((n,), -1, dtype=torch.int32),
            )

    def spec(self) -> dict:
        """Provenance for the store's manifest; `revision` is what was loaded (a commit sha for hub
        models), not what was asked for, so a moving branch cannot hide a change of weights."""
        return {"kind": "embedding", "model": embedder_hub_id(self.cfg.model), "revision": self.revision(),
                "hooks": self.hooks, "d_in": self.d_in, "dtype": "float32",
                "forward_dtype": resolve_forward_dtype(self.cfg.forward_dtype, self.cfg.device),
                "max_length": int(self.model.max_seq_length)}

    def revision(self) -> str:
        loaded = getattr(self.model, "saekit_revision", None)
        if loaded is None:  # a model the caller built: say so rather than claim the requested revision
            log.warning("EmbeddingSource: the model was not loaded by load_embedder; its revision is unknown")
            return "unknown-caller-model"
        return loaded
