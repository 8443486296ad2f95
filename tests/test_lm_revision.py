"""Language-model sources record the revision that was loaded and honour `revision` offline
(docs/RELIABILITY.md 14), as tests/test_embedding_revision.py does for embeddings: a hub cache is built
with two commits of a tiny random Llama (2 layers, width 32, a word-level tokenizer), `main` pointing at
the first; the second has other weights. The child process loads with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHA_MAIN = "1" * 40
SHA_OTHER = "2" * 40
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "i", "love", "this", "so", "much"]

_CHILD = """
import json, sys, torch
from saekit.errors import ModelNotAvailableError
from saekit.sources.base import SourceConfig
from saekit.sources.hf import HFSource, tokenize

def source(model, revision):
    return HFSource(SourceConfig(kind="hf", model=model, revision=revision, hooks=["model.layers.1"], batch_size=2,
                                 max_length=16))

out = {}
texts = ["the cat sat on the mat", "i love this so much"]
for label, model, revision in [("main", "acme/tiny-lm", "main"), ("default_branch", "acme/tiny-lm", None),
                               ("other", "acme/tiny-lm", sys.argv[1]), ("folder", sys.argv[2], None)]:
    src = source(model, revision)
    acts = src.forward_acts(tokenize(src.tok, texts, src.cfg))["model.layers.1"]
    out[label] = {"revision": src.spec()["revision"], "acts": acts.tolist()}
for label, model, revision in [("missing", "acme/tiny-lm", "f" * 40), ("folder_rev", sys.argv[2], "main")]:
    try:
        source(model, revision)
        out[label] = "loaded"
    except ModelNotAvailableError as e:
        out[label] = str(e)
print(json.dumps(out))
"""


def _tiny_lm(folder: Path, seed: int) -> None:
    """A 2-layer Llama of width 32 with random weights (seeded) and a word-level tokenizer, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=2, eos_token_id=3, pad_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def _fake_hub(cache: Path) -> Path:
    """Two snapshots of acme/tiny-lm (seeds 0 and 1) with refs/main -> the first; returns the first's folder."""
    repo = cache / "models--acme--tiny-lm"
    for sha, seed in ((SHA_MAIN, 0), (SHA_OTHER, 1)):
        _tiny_lm(repo / "snapshots" / sha, seed)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA_MAIN)
    return repo / "snapshots" / SHA_MAIN


def test_resolved_revision_is_recorded_and_revision_is_honoured(tmp_path):
    folder = _fake_hub(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, SHA_OTHER, str(folder)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["main"]["revision"] == out["default_branch"]["revision"] == SHA_MAIN  # resolved, not "main"
    assert out["other"]["revision"] == SHA_OTHER
    assert out["folder"]["revision"].startswith("local-")  # a folder has no commit: a hash of its config
    acts = {k: torch.tensor(out[k]["acts"]) for k in ("main", "default_branch", "other", "folder")}
    assert torch.equal(acts["main"], acts["default_branch"]) and torch.equal(acts["main"], acts["folder"])
    assert (acts["other"] - acts["main"]).abs().max() > 1e-2  # the other commit's weights were loaded
    assert "f" * 40 in out["missing"]
    assert "has no revisions" in out["folder_rev"] and "'main'" in out["folder_rev"]
