"""Hugging Face transformers source: activations at module paths, forward stopped after the last."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from saekit.sources.base import ActivationBatch, SourceConfig
from saekit.sources.hooks import capture, resolve
from saekit.sources.models import hub_id, load_lm, model_revision, tokenizer_hash
from saekit.sources.precision import forward_context, resolve_forward_dtype


def tokenize(tok, texts: list[str], cfg: SourceConfig) -> dict[str, Tensor]:
    """Pad a batch; position ids come from the mask so left and right padding agree on real tokens."""
    tok.padding_side = cfg.padding_side
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True,
              max_length=cfg.max_length - int(cfg.prepend_bos))
    ids_BT, mask_BT = enc["input_ids"], enc["attention_mask"]
    if cfg.prepend_bos and tok.bos_token_id is not None:
        bos = torch.full((len(texts), 1), tok.bos_token_id, dtype=ids_BT.dtype)
        ids_BT = torch.cat([bos, ids_BT], 1) if cfg.padding_side == "right" else _insert_bos_left(ids_BT, mask_BT, bos)
        mask_BT = torch.cat([torch.ones_like(mask_BT[:, :1]), mask_BT], 1) if cfg.padding_side == "right" \
            else torch.cat([mask_BT[:, :1] * 0, mask_BT], 1).scatter(1, first_real(mask_BT), 1)
    pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids_BT, "attention_mask": mask_BT, "position_ids": pos_BT}


def first_real(mask_BT: Tensor) -> Tensor:
    return mask_BT.argmax(-1, keepdim=True)  # first 1 of each row (for left padding); +1 shift below


def _insert_bos_left(ids_BT: Tensor, mask_BT: Tensor, bos_B1: Tensor) -> Tensor:
    ids = torch.cat([ids_BT[:, :1], ids_BT], 1)
    return ids.scatter(1, first_real(mask_BT), bos_B1)


def keep_mask(ids_BT: Tensor, mask_BT: Tensor, special_ids: set[int], exclude_special: bool) -> Tensor:
    """Rows that enter the store: real tokens, minus special tokens unless configured otherwise."""
    keep = mask_BT.bool()
    if exclude_special and special_ids:
        keep &= ~torch.isin(ids_BT, torch.tensor(sorted(special_ids)))
    return keep


def rows_from(acts: dict[str, Tensor], enc: dict[str, Tensor], doc_ids: list[int], keep_BT: Tensor) -> ActivationBatch:
    b_idx, t_idx = keep_BT.nonzero(as_tuple=True)
    return ActivationBatch(
        acts={h: a[b_idx, t_idx].float().contiguous() for h, a in acts.items()},
        doc_id=torch.tensor(doc_ids, dtype=torch.int64)[b_idx],
        pos=enc["position_ids"][b_idx, t_idx].to(torch.int32),
        token_id=enc["input_ids"][b_idx, t_idx].to(torch.int32),
    )


class HFSource:
    """Reads several module paths in one forward pass of a transformers model."""

    def __init__(self, cfg: SourceConfig, model=None, tokenizer=None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = load_lm(cfg.model, cfg.revision, cfg.dtype)
        self.model, self.tok = model.to(cfg.device), tokenizer
        self.hooks = list(cfg.hooks)
        for h in self.hooks:
            resolve(self.model, h)  # fail early, listing the nearest valid names
        self.special_ids = set(self.tok.all_special_ids)
        self.d_in = {h: self.model.config.hidden_size for h in self.hooks}

    def forward_acts(self, enc: dict[str, Tensor]) -> dict[str, Tensor]:
        enc = {k: v.to(self.cfg.device) for k, v in enc.items()}
        with forward_context(self.cfg.forward_dtype, self.cfg.device):
            return capture(self.model, self.hooks, lambda: self.model(**enc, use_cache=False))

    def iter_batches(self, docs: list[dict]) -> Iterator[ActivationBatch]:
        for i in range(0, len(docs), self.cfg.batch_size):
            chunk = docs[i: i + self.cfg.batch_size]
            enc = tokenize(self.tok, [d["text"] for d in chunk], self.cfg)
            acts = {h: a.cpu() for h, a in self.forward_acts(enc).items()}
            keep = keep_mask(enc["input_ids"], enc["attention_mask"], self.special_ids, self.cfg.exclude_special)
            yield rows_from(acts, enc, [d["doc_id"] for d in chunk], keep)

    def spec(self) -> dict:
        return {"kind": "hf", "model": hub_id(self.cfg.model), "revision": model_revision(self.model),
                "hooks": self.hooks, "d_in": self.d_in, "dtype": self.cfg.dtype,
                "forward_dtype": resolve_forward_dtype(self.cfg.forward_dtype, self.cfg.device),
                "tokenizer_hash": tokenizer_hash(self.tok), "max_length": self.cfg.max_length,
                "exclude_special": self.cfg.exclude_special, "prepend_bos": self.cfg.prepend_bos}
