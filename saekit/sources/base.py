"""The ActivationSource protocol: documents in, activation rows with provenance out.

Every source yields `ActivationBatch`es: for each hook, `acts [n, d_in]`, and for every row its
`doc_id`, `pos` and `token_id` (both -1 for pooled embeddings). Padding and, by default, special
tokens (BOS, EOS, ...) never appear in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Protocol

from torch import Tensor

from saekit.config import Config, param


@dataclass
class ActivationBatch:
    acts: dict[str, Tensor]  # hook -> [n, d_in]
    doc_id: Tensor  # [n] int64
    pos: Tensor  # [n] int32, -1 for embeddings
    token_id: Tensor  # [n] int32, -1 for embeddings

    @property
    def n(self) -> int:
        return len(self.doc_id)


class ActivationSource(Protocol):
    hooks: list[str]
    d_in: dict[str, int]

    def iter_batches(self, docs: list[dict]) -> Iterator[ActivationBatch]: ...

    def spec(self) -> dict:
        """What produced the rows (model id, revision, hooks, dtype, tokenizer hash...), for manifests."""


@dataclass
class SourceConfig(Config):
    """Which model, which hook points, and how to batch documents through it."""

    kind: Literal["hf", "lens", "embedding"] = param("hf", "hf (module paths), lens (TransformerLens hook names) "
                                                     "or embedding (sentence-transformers pooled vectors)")
    model: str = param("default", "'default' = the embedded model of this kind, else a hub id or local path")
    revision: str | None = param(None, "hub revision (branch, tag or commit) for hub models")
    hooks: list[str] = param([], "hook points: HF module paths or TransformerLens hook names (unused for embedding)")
    max_length: int = param(128, "tokens per document; longer documents are truncated", ge=2)
    batch_size: int = param(16, "documents per forward pass", ge=1)
    exclude_special: bool = param(True, "keep BOS/EOS/other special tokens out of the store")
    prepend_bos: bool = param(True, "prepend the tokenizer's BOS token, which then takes the attention-sink role "
                              "(huge-norm first position) and is excluded from the store unless exclude_special=false")
    padding_side: Literal["right", "left"] = param("right", "padding side for batched forwards")
    dtype: str = param("float32", "dtype the model's weights are loaded in (HF sources)",
                       choices=["float32", "bfloat16", "float16"])
    forward_dtype: str = param("float32", "precision of the caching forward pass: float32, bfloat16 (autocast: fp32 "
                               "weights, matmuls and attention in bf16, rows stored in store.dtype) or auto (bfloat16 "
                               "on CUDA with bf16 and on CPUs with AVX512-BF16/AMX, else float32); recorded in the "
                               "store's manifest", choices=["float32", "bfloat16", "auto"])
    device: str = param("cpu", "device for the model forward")

    @classmethod
    def from_spec(cls, spec: dict) -> "SourceConfig":
        """The config a store's manifest `source` spec was made with, as far as the spec records it
        (model, hooks, tokenisation); so a live page tokenises text exactly as caching did."""
        keys = ("kind", "model", "hooks", "max_length", "exclude_special", "prepend_bos", "dtype", "forward_dtype")
        return cls.from_dict({k: spec[k] for k in keys if k in spec}, where="store manifest source")

    def validate(self) -> None:
        from saekit.errors import ConfigError

        if self.kind != "embedding" and not self.hooks:
            raise ConfigError(f"source.hooks: expected at least one hook point for kind '{self.kind}', found []")
