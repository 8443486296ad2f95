"""Top-k SAE behaviour: folding, BatchTopK, dead latents and AuxK, recovery, loss known answers."""

from __future__ import annotations

import pytest
import torch

from saekit.data.synthetic import planted_features
from saekit.sae.base import ForwardOutput, SparseCode
from saekit.sae.registry import load_sae, save_sae
from saekit.sae.topk import TopKConfig, TopKSAE, geometric_median


def make(seed=0, **kw) -> TopKSAE:
    cfg = TopKConfig.from_dict({"d_in": 16, "d_sae": 64, "k": 4, "seed": seed} | kw)
    sae = TopKSAE(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(64, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(16, generator=g))
    return sae


def train(sae: TopKSAE, x_ND: torch.Tensor, steps: int, batch: int = 256, lr: float = 1e-2) -> TopKSAE:
    sae.init_from_data(x_ND[:1024])
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for s in range(steps):
        start = (s * batch) % x_ND.shape[0]
        x = x_ND[start:start + batch]
        loss = sae.loss(x, sae(x))
        opt.zero_grad()
        loss.total.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return sae


# -- folding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_topk", [False, True])
def test_folding_keeps_raw_reconstructions(batch_topk, tmp_path):
    sae = make(batch_topk=batch_topk)
    scale = 3.7
    sae.set_input_scale(scale)
    x_raw = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    if batch_topk:
        sae(torch.randn(32, 16) * scale)  # training forward estimates the threshold (on other rows: the
        # smallest kept value of this batch would sit exactly on the threshold)
        assert float(sae.threshold) > 0
    sae.eval()
    with torch.no_grad():
        want = sae(x_raw * scale).recon / scale
        folded = sae.folded_copy()
        torch.testing.assert_close(folded(x_raw).recon, want, rtol=0, atol=1e-5)
        assert not hasattr(folded, "input_scale")
        torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(64))
        save_sae(sae, tmp_path / "sae")  # the export folds too
        torch.testing.assert_close(load_sae(tmp_path / "sae").eval()(x_raw).recon, want, rtol=0, atol=1e-5)


# -- BatchTopK ---------------------------------------------------------------------------------------
def test_batch_topk_exact_count_in_training_and_threshold_at_inference():
    sae = make(batch_topk=True)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    out = sae(x)
    assert int((out.code.values != 0).sum()) == 4 * 24  # exactly k*B in the batch
    assert not (out.code.l0() == 4).all()  # ... but not k in every row
    torch.testing.assert_close(out.recon, sae.decode(out.code), rtol=0, atol=1e-6)
    thr = float(sae.threshold)
    assert thr == pytest.approx(float(out.code.values.detach()[out.code.values > 0].min()))

    sae.eval()
    with torch.no_grad():
        code = sae.encode(x)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    want = torch.where(pre > thr, pre, torch.zeros_like(pre))
    torch.testing.assert_close(code.dense(), want)  # every latent above the threshold, and only those


def test_batch_topk_threshold_is_an_ema():
    sae = make(batch_topk=True, threshold_momentum=0.5)
    g = torch.Generator().manual_seed(3)
    mins = []
    for _ in range(3):
        out = sae(torch.randn(16, 16, generator=g))
        mins.append(float(out.code.values.detach()[out.code.values > 0].min()))
    want = 0.5 * (0.5 * mins[0] + 0.5 * mins[1]) + 0.5 * mins[2]
    assert float(sae.threshold) == pytest.approx(want, rel=1e-5)


# -- dead latents and AuxK ---------------------------------------------------------------------------------
def test_dead_latent_tracking_and_training_state():
    sae = make(dead_tokens_threshold=100)
    with torch.no_grad():
        sae.b_enc[0] = -1e6  # latent 0 can never fire
    g = torch.Generator().manual_seed(4)
    sae(torch.randn(60, 16, generator=g))
    assert int(sae.tokens_since_fired[0]) == 60 and sae.dead_fraction() == 0
    out = sae(torch.randn(60, 16, generator=g))
    assert int(sae.tokens_since_fired[0]) == 120
    assert bool(sae.tokens_since_fired[0] >= 100)
    fired = out.code.indices[out.code.values > 0].unique()
    assert (sae.tokens_since_fired[fired] == 0).all()
    assert "auxk_recon" not in out.aux  # first forward had no dead latents yet ...
    out = sae(torch.randn(60, 16, generator=g))
    assert "auxk_recon" in out.aux  # ... now latent 0 (at least) is dead and AuxK runs
    # training-only state: checkpointed via named_buffers (as the trainer's checkpoint does), not exported
    assert "tokens_since_fired" not in sae.state_dict()
    assert "tokens_since_fired" in dict(sae.named_buffers())
    other = make(dead_tokens_threshold=100)
    for name, buf in other.named_buffers():
        buf.copy_(dict(sae.named_buffers())[name])
    assert torch.equal(other.tokens_since_fired, sae.tokens_since_fired)
    sae.eval()
    before = sae.tokens_since_fired.clone()
    sae(torch.randn(8, 16, generator=g))
    assert torch.equal(before, sae.tokens_since_fired)  # inference does not touch the counters


def test_auxk_lowers_dead_fraction(one_thread):
    data = planted_features(8192, 32, 64, avg_active=3, seed=0)
    dead = {}
    for coef in (0.0, 1 / 32):
        cfg = TopKConfig(d_in=32, d_sae=128, k=4, dead_tokens_threshold=1024, aux_coef=coef, aux_k=16)
        torch.manual_seed(0)
        sae = TopKSAE(cfg)
        with torch.no_grad():  # bad init: half of the latents are too weak to ever win the top-k
            sae.W_enc[:, 64:] *= 0.01
        train(sae, data.x_ND, steps=120)
        dead[coef] = sae.dead_fraction()
    assert dead[0.0] >= 0.35
    assert dead[1 / 32] < dead[0.0] - 0.15, dead


# -- recovery -------------------------------------------------------------------------------------------
def test_recovers_planted_features(one_thread):
    torch.manual_seed(0)
    data = planted_features(16384, 32, 64, avg_active=3, seed=0)
    sae = train(TopKSAE(TopKConfig(d_in=32, d_sae=128, k=4, dead_tokens_threshold=4096)), data.x_ND, steps=400)
    W = sae.W_dec.detach()
    cos = data.D_FD @ (W / W.norm(dim=1, keepdim=True)).T
    assert cos.max(1).values.mean() >= 0.9


# -- training callbacks and init ------------------------------------------------------------------------------
def test_decoder_rows_stay_unit_and_parallel_gradient_removed():
    sae = make()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)  # tied init
    x = torch.randn(32, 16)
    sae.loss(x, sae(x)).total.backward()
    sae.before_optimizer_step()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(64), rtol=0, atol=1e-5)
    torch.optim.Adam(sae.parameters(), lr=0.1).step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_geometric_median_known_answers():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1000.0]], dtype=torch.float64)
    assert float(geometric_median(x, iters=200)) == pytest.approx(2.0, abs=1e-3)  # 1-D: the median
    square = torch.tensor([[1.0, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float64) + 5
    torch.testing.assert_close(geometric_median(square), torch.tensor([5.0, 5.0], dtype=torch.float64))
    sae = make()
    sae.init_from_data(torch.cat([square.float().repeat(1, 8)]))
    torch.testing.assert_close(sae.b_dec, torch.full((16,), 5.0))


# -- loss known answers ------------------------------------------------------------------------------------
def test_loss_known_answers():
    sae = make(aux_coef=0.5)
    x = torch.tensor([[1.0] * 16, [0.0] * 16])
    recon = torch.zeros(2, 16)
    recon[0, :4] = 1.0  # row 0 misses 12 units -> 12; row 1 exact -> 0
    code = SparseCode(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), 64)
    out = sae.loss(x, ForwardOutput(recon, code))
    assert out.parts == {"mse": 6.0} and float(out.total) == 6.0
    e_hat = torch.zeros(2, 16)
    e_hat[0, 4:10] = 1.0  # residual row 0 has 12 ones; 6 recovered -> 6; row 1 e=0, e_hat=0 -> 0
    out = sae.loss(x, ForwardOutput(recon, code, {"auxk_recon": e_hat}))
    assert out.parts == {"mse": 6.0, "auxk": 3.0}
    assert float(out.total) == pytest.approx(6.0 + 0.5 * 3.0)


def test_config_rejects_k_above_width():
    from saekit.errors import ConfigError

    with pytest.raises(ConfigError, match="k"):
        TopKConfig.from_dict({"d_in": 4, "d_sae": 8, "k": 9})
