"""A Hugging Face causal LM as a chat backend, loaded through saekit's model loader (the embedded
SmolLM2-135M-Instruct by default), greedy decoding so answers are reproducible and cacheable."""

from __future__ import annotations

import threading

import torch

from saekit.analysis.explain.cache import ChatResult
from saekit.sources.models import hub_id, load_lm


class LocalChat:
    """Chat completions from a local causal LM, one at a time (loading and generation are not thread-safe)."""

    name = "local"

    def __init__(self, model: str = "default", max_tokens: int = 60):
        self.model_name = model or "default"
        self.max_tokens = max_tokens
        self.identity = {"kind": "local", "model": hub_id(self.model_name), "max_tokens": max_tokens, "greedy": True}
        self._lock = threading.Lock()

    @torch.no_grad()
    def complete(self, messages: list[dict]) -> ChatResult:
        with self._lock:  # one load (the runner calls from several threads) and one generation at a time
            return self._complete(messages)

    def _complete(self, messages: list[dict]) -> ChatResult:
        model, tok = load_lm(self.model_name)
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tok("\n\n".join(m["content"] for m in messages), return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:]
        return ChatResult(tok.decode(new, skip_special_tokens=True).strip(), int(ids.shape[1]), int(len(new)))
