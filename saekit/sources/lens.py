"""TransformerLens source: hook names through `run_with_cache` with a names filter and stop_at_layer.

Works with TransformerLens 4.x (`TransformerBridge` wrapping the same HF model, no download) and
3.x (`HookedTransformer`). Token ids are passed explicitly (TransformerLens would prepend BOS to
strings) with right padding, so causal attention keeps real tokens independent of the padding.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import torch

from saekit.sources.base import ActivationBatch, SourceConfig
from saekit.sources.hf import keep_mask, rows_from, tokenize
from saekit.sources.hooks import resolve
from saekit.sources.models import hub_id, load_lens, load_lm, model_revision, tokenizer_hash
from saekit.sources.precision import forward_context, resolve_forward_dtype


def stop_layer(hooks: list[str]) -> int | None:
    """One past the deepest block any hook reads (None when a hook lies after the blocks)."""
    layers = []
    for h in hooks:
        m = re.match(r"blocks\.(\d+)\.", h)
        if m is None:
            return None
        layers.append(int(m.group(1)))
    return max(layers) + 1


class LensSource:
    def __init__(self, cfg: SourceConfig, model=None, tokenizer=None):
        self.cfg = dataclasses.replace(cfg, padding_side="right")
        self.model = model if model is not None else load_lens(cfg.model)
        self.tok = tokenizer if tokenizer is not None else load_lm(cfg.model)[1]
        self.hooks = list(cfg.hooks)
        for h in self.hooks:
            resolve(self.model, h)
        self.special_ids = set(self.tok.all_special_ids)
        self.d_in = {h: self.model.cfg.d_model for h in self.hooks}

    @torch.no_grad()
    def forward_acts(self, enc) -> dict[str, torch.Tensor]:
        with forward_context(self.cfg.forward_dtype, self.cfg.device):
            _, cache = self.model.run_with_cache(enc["input_ids"].to(self.cfg.device), names_filter=self.hooks,
                                                 stop_at_layer=stop_layer(self.hooks))
        return {h: cache[h].detach().cpu() for h in self.hooks}

    def iter_batches(self, docs: list[dict]) -> Iterator[ActivationBatch]:
        for i in range(0, len(docs), self.cfg.batch_size):
            chunk = docs[i: i + self.cfg.batch_size]
            enc = tokenize(self.tok, [d["text"] for d in chunk], self.cfg)
            acts = self.forward_acts(enc)
            keep = keep_mask(enc["input_ids"], enc["attention_mask"], self.special_ids, self.cfg.exclude_special)
            yield rows_from(acts, enc, [d["doc_id"] for d in chunk], keep)

    def spec(self) -> dict:
        hf = getattr(self.model, "original_model", None) or load_lm(self.cfg.model)[0]
        return {"kind": "lens", "model": hub_id(self.cfg.model), "revision": model_revision(hf),
                "hooks": self.hooks, "d_in": self.d_in, "dtype": self.cfg.dtype,
                "forward_dtype": resolve_forward_dtype(self.cfg.forward_dtype, self.cfg.device),
                "tokenizer_hash": tokenizer_hash(self.tok), "max_length": self.cfg.max_length,
                "exclude_special": self.cfg.exclude_special, "prepend_bos": self.cfg.prepend_bos}
