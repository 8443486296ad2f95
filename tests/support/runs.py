"""Small self-contained runs for tests, benchmarks and demos of the browser (no hub, no big model).

* `tiny_lm(folder)`: a 2-layer GPT-2 with a word-level tokenizer over a small vocabulary, saved as
  a local transformers folder, so `load_lm(folder)` works offline and the live pages can run it.
* `synthetic_docs(n)`: labelled sentences over that vocabulary.
* `TokenNoiseSource`: an activation source without a model (a fixed random vector per token id plus
  noise), so `saekit.store.writer.cache_activations` itself writes stores of any size quickly.
* `tiny_run(...)` / `tiny_embedding_run(...)`: a run folder (store + SAE) with dead features and a
  feature that fires exactly once; `synthetic_llm_run(...)`: a run of any size over `TokenNoiseSource`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from saekit.layout import RunFolder
from saekit.sources.base import ActivationBatch
from saekit.store.writer import StoreConfig, cache_activations

WORDS = ("the a cat dog bird fish red blue green happy sad angry calm fast slow big small runs eats sleeps "
         "sings jumps over under near and but very not today tomorrow rain sun moon star tree river city").split()
SENTIMENT = {"happy": "positive", "calm": "positive", "sad": "negative", "angry": "negative"}


def tiny_lm(folder: str | Path, d_model: int = 32, n_layer: int = 2, seed: int = 0) -> Path:
    """Save a random tiny GPT-2 + word-level tokenizer to `folder` (loadable with `load_lm(folder)`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=d_model, n_layer=n_layer,
                                       n_head=2, bos_token_id=1, eos_token_id=1))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def synthetic_docs(n: int, seed: int = 0, min_words: int = 4, max_words: int = 12) -> list[dict]:
    """Labelled sentences over WORDS: sentiment from the mood word, topic from the animal."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = list(rng.choice(WORDS, size=int(rng.integers(min_words, max_words + 1))))
        mood = next((w for w in words if w in SENTIMENT), None)
        animal = next((w for w in words if w in ("cat", "dog", "bird", "fish")), "none")
        docs.append({"doc_id": i, "text": " ".join(words),
                     "labels": {"sentiment": SENTIMENT.get(mood, "neutral"), "topic": animal}})
    return docs


class TokenNoiseSource:
    """An ActivationSource over `WORDS` documents without a model forward: each token's row is a fixed
    random vector of its token id plus noise (so rows cluster by token). The store is then written by
    the writer's own `cache_activations`, in the one on-disk format."""

    def __init__(self, spec: dict, vocab_size: int, seed: int = 0):
        self._spec, self.hooks, self.d_in = spec, list(spec["hooks"]), dict(spec["d_in"])
        self.g = torch.Generator().manual_seed(seed)
        self.emb_VD = torch.randn(vocab_size, self.d_in[self.hooks[0]], generator=self.g)

    def spec(self) -> dict:
        return self._spec

    def iter_batches(self, docs: list[dict]) -> Iterator[ActivationBatch]:
        ids = [[2 + WORDS.index(w) for w in d["text"].split()] for d in docs]
        tok = torch.tensor([t for row in ids for t in row], dtype=torch.int32)
        acts_ND = self.emb_VD[tok.long()] + 0.3 * torch.randn(len(tok), self.emb_VD.shape[1], generator=self.g)
        yield ActivationBatch(
            acts={h: acts_ND for h in self.hooks}, token_id=tok,
            doc_id=torch.tensor([d["doc_id"] for d, row in zip(docs, ids) for _ in row], dtype=torch.int64),
            pos=torch.tensor([p for row in ids for p in range(len(row))], dtype=torch.int32))


def llm_spec(model: str, hook: str, d_in: int) -> dict:
    return {"kind": "hf", "model": model, "revision": "local", "hooks": [hook], "d_in": {hook: d_in},
            "dtype": "float32", "max_length": 64, "exclude_special": True, "prepend_bos": False}


def make_sae(d_in: int, d_sae: int, k: int, dead: list[int] = (), seed: int = 0):
    """A random top-k SAE whose `dead` features can never fire (their pre-activation is always < 0)."""
    from saekit.sae.registry import create

    sae = create({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "seed": seed})
    with torch.no_grad():
        for f in dead:
            sae.W_enc[:, f] = 0
            sae.b_enc[f] = -1e4
    return sae


def make_one_shot(sae, acts_ND: torch.Tensor, feature: int) -> int:
    """Tune `feature` so that it fires on exactly one row of `acts_ND` (its best-aligned row); returns it."""
    with torch.no_grad():
        u = torch.nn.functional.normalize(torch.randn(acts_ND.shape[1], generator=torch.Generator().manual_seed(7)), dim=0)
        proj = (acts_ND - sae.b_dec) @ u
        top2 = proj.topk(2).values
        sae.W_enc[:, feature] = u * 1e3
        sae.b_enc[feature] = -1e3 * float(top2.mean())
        sae.W_dec[feature] = u * 1e-3  # decodes its (1e3-scaled) value back to the projection's size
        return int(proj.argmax())


def _save_run_sae(run_dir: Path, d_sae: int, k: int, dead: tuple, one_shot: int, seed: int) -> Path:
    """The run's SAE: random, centred on the store's rows (so the preflight's first FVU is < 1, as for
    a trained SAE), with `dead` features that never fire and one feature that fires on one row."""
    from saekit.sae.registry import save_sae
    from saekit.store.reader import ActivationStore

    store = ActivationStore(RunFolder(run_dir).store)
    sae = make_sae(store.d_in, d_sae, k, list(dead), seed)
    with torch.no_grad():
        sae.b_dec.copy_(store[:].mean(0))
    make_one_shot(sae, store[:], one_shot)
    save_sae(sae, RunFolder(run_dir).final_sae())
    return run_dir


def tiny_run(run_dir: str | Path, n_docs: int = 120, d_sae: int = 48, k: int = 4, dead: tuple = (0, 1, 2),
             one_shot: int = 3, model_dir: str | Path | None = None, seed: int = 0) -> Path:
    """An LLM-kind run folder over the tiny GPT-2's residual stream (real forward through the source)."""
    from saekit.sources.base import SourceConfig
    from saekit.sources.factory import make_source

    run_dir = Path(run_dir)
    model_dir = tiny_lm(model_dir or run_dir.parent / "tiny_lm")
    source = make_source(SourceConfig(kind="hf", model=str(model_dir), hooks=["transformer.h.1"], batch_size=32))
    cache_activations(source, synthetic_docs(n_docs, seed), RunFolder(run_dir).store, StoreConfig(docs_per_shard=64))
    return _save_run_sae(run_dir, d_sae, k, dead, one_shot, seed)


def tiny_embedding_run(run_dir: str | Path, docs: list[dict], model=None, d_sae: int = 64, k: int = 4,
                       dead: tuple = (0, 1), one_shot: int = 2, seed: int = 0) -> Path:
    """An embedding run over `docs` with the default sentence-transformers model (or `model`)."""
    from saekit.sources.base import SourceConfig
    from saekit.sources.embeddings import EmbeddingSource

    run_dir = Path(run_dir)
    cache_activations(EmbeddingSource(SourceConfig(kind="embedding", batch_size=64), model=model), docs,
                      RunFolder(run_dir).store, StoreConfig(docs_per_shard=64))
    return _save_run_sae(run_dir, d_sae, k, dead, one_shot, seed)


def synthetic_llm_run(run_dir: str | Path, n_rows: int, d_sae: int = 512, k: int = 16, d_in: int = 32,
                      tokens_per_doc: int = 50, seed: int = 0) -> Path:
    """An LLM-kind run of about `n_rows` rows written directly (no forward), over the tiny GPT-2's
    vocabulary and width, so the logit lens and token text work; for scale tests and benchmarks."""
    from saekit.sae.registry import save_sae

    run_dir = Path(run_dir)
    model_dir = tiny_lm(run_dir / "tiny_lm", d_model=d_in)
    n_docs = max(1, n_rows // tokens_per_doc)
    docs = synthetic_docs(n_docs, seed, min_words=tokens_per_doc, max_words=tokens_per_doc)
    source = TokenNoiseSource(llm_spec(str(model_dir), "transformer.h.1", d_in), len(WORDS) + 2, seed)
    cache_activations(source, docs, RunFolder(run_dir).store, StoreConfig(docs_per_shard=256))
    save_sae(make_sae(d_in, d_sae, k, [0], seed), RunFolder(run_dir).final_sae())
    return run_dir
