"""Cross-run feature comparison: known answers on stores that are exact rotations of each other (written
by the store's own writer), SVCCA/CKA against their shuffled baselines, matching, document pooling."""

import pytest
import torch

from saekit.analysis.compare_features import (Side, compare_features, correlation_matrix, linear_cka,
                                              match_latents, same_tokenisation, svcca)
from saekit.errors import ConfigError
from saekit.sae.registry import create
from saekit.store.reader import ActivationStore
from saekit.store.writer import StoreConfig, cache_activations
from support.runs import WORDS, TokenNoiseSource, llm_spec, synthetic_docs

D, F = 16, 32


class RotatedSource(TokenNoiseSource):
    """The same rows as TokenNoiseSource (same seed), multiplied by an orthogonal matrix."""

    def __init__(self, spec, vocab, seed, R_DD):
        super().__init__(spec, vocab, seed)
        self.R_DD = R_DD

    def iter_batches(self, docs):
        for b in super().iter_batches(docs):
            b.acts = {h: a @ self.R_DD for h, a in b.acts.items()}
            yield b


def _stores(tmp_path, R_DD):
    docs = synthetic_docs(80, seed=0)
    spec = llm_spec("tiny", "h.1", D)
    spec["tokenizer_hash"] = "same"
    vocab = len(WORDS) + 2
    cache_activations(TokenNoiseSource(spec, vocab, 0), docs, tmp_path / "a", StoreConfig(docs_per_shard=32))
    cache_activations(RotatedSource(spec, vocab, 0, R_DD), docs, tmp_path / "b", StoreConfig(docs_per_shard=32))
    return ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")


def _rotated_sae(sae, R_DD, perm_F):
    """An SAE that encodes x @ R exactly as `sae` encodes x, with its latents reordered by perm_F."""
    twin = create({"architecture": "topk", "d_in": D, "d_sae": F, "k": sae.cfg.k, "seed": 5})
    with torch.no_grad():
        twin.W_enc.copy_((R_DD.T @ sae.W_enc)[:, perm_F])
        twin.b_enc.copy_(sae.b_enc[perm_F])
        twin.W_dec.copy_((sae.W_dec @ R_DD)[perm_F])
        twin.b_dec.copy_(sae.b_dec @ R_DD)
    return twin.eval()


@pytest.fixture
def rotated(tmp_path):
    g = torch.Generator().manual_seed(3)
    R_DD = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    store_a, store_b = _stores(tmp_path, R_DD)
    sae = create({"architecture": "topk", "d_in": D, "d_sae": F, "k": 8, "seed": 0}).eval()
    with torch.no_grad():  # every latent fires somewhere: centre the SAE on the rows
        sae.b_dec.copy_(store_a[:].mean(0))
    perm_F = torch.randperm(F, generator=g)
    return Side(sae, store_a, "A"), Side(_rotated_sae(sae, R_DD, perm_F), store_b, "B"), perm_F


def test_rotated_stores_match_every_latent_and_give_svcca_one(rotated):
    a, b, perm_F = rotated
    assert same_tokenisation(a.store, b.store)
    res = compare_features(a, b, threshold=0.9)
    s = res.summary()
    assert s["level"] == "token" and s["aligned_rows"] == len(a.store)
    assert s["alive_a"] == F and s["share_matched"] == 1.0
    inverse = torch.argsort(perm_F)
    assert all(b_ == int(inverse[a_]) and c > 0.999 for a_, b_, c in res.pairs)  # each latent finds its twin
    assert s["svcca"] > 0.999 and s["cka"] > 0.999
    assert s["svcca_permuted"] < 0.5 and s["cka_permuted"] < 0.2
    assert res.examples and all(len(v["a"]) == 3 for v in res.examples.values())


def test_token_examples_show_the_token_in_its_context(rotated):
    a, b, _ = rotated
    words = lambda ids: "".join(" " + WORDS[i - 2] for i in ids)  # noqa: E731  (ids as space-led tokens)
    res = compare_features(a, b, threshold=0.9, decode=words, top_pairs=5)
    for ex in res.examples.values():
        for e in ex["a"] + ex["b"]:
            focal = e["context"].split("[[")[1].split("]]")[0]
            assert focal.strip() == e["text"].split()[e["pos"]]  # the row's own token, from its document
            assert e["context"].replace("[[", "").replace("]]", "").strip() in e["text"]


def test_unrelated_sae_matches_poorly(rotated):
    a, b, _ = rotated
    other = create({"architecture": "topk", "d_in": D, "d_sae": F, "k": 8, "seed": 9}).eval()
    with torch.no_grad():
        other.b_dec.copy_(b.store[:].mean(0))
    s = compare_features(a, Side(other, b.store, "other"), threshold=0.9).summary()
    assert s["share_matched"] < 0.5


def test_document_level_pools_per_document(rotated):
    a, b, perm_F = rotated
    res = compare_features(a, b, level="document", threshold=0.9)
    s = res.summary()
    assert s["level"] == "document" and s["aligned_rows"] == len(a.store.docs)
    assert s["svcca"] > 0.999
    inverse = torch.argsort(perm_F)
    assert all(b_ == int(inverse[a_]) for a_, b_, _ in res.pairs)


def test_statistics_known_answers():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 6, generator=g)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    assert svcca(X, X @ Q) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(X, 3.0 * X @ Q) == pytest.approx(1.0, abs=1e-6)
    Y = torch.randn(500, 6, generator=g)
    assert svcca(X, Y) < 0.2 and linear_cka(X, Y) < 0.1
    C = correlation_matrix(torch.cat([X, torch.zeros(500, 1)], 1), X)
    assert torch.allclose(C[:6].diagonal(), torch.ones(6), atol=1e-5) and torch.all(C[6] == 0)


@pytest.mark.parametrize("method", ["hungarian", "mnn"])
def test_matching_recovers_a_permutation(method):
    perm = torch.tensor([2, 0, 3, 1])
    C = torch.full((4, 4), 0.1)
    C[torch.arange(4), perm] = 0.9
    alive = torch.ones(4, dtype=torch.bool)
    ia, ib = match_latents(C, alive, alive, method)
    assert dict(zip(ia.tolist(), ib.tolist())) == {i: int(perm[i]) for i in range(4)}
    with pytest.raises(ConfigError):
        match_latents(C, alive, alive, "greedy")


def test_document_level_refuses_different_texts(tmp_path, rotated):
    a, b, _ = rotated
    import json
    docs = (b.store.path / "docs.jsonl").read_text().splitlines()
    d = json.loads(docs[0])
    d["text"] = "something else entirely"
    b.store.__dict__["docs"] = {**b.store.docs, int(d["doc_id"]): d}
    with pytest.raises(ConfigError, match="same documents"):
        compare_features(a, b, level="document")
