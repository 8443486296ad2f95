"""MDL-SAE on real activations (issue 24): robust loss scaling, the λ controller, data-driven thresholds."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.data.synthetic import planted_features
from saekit.errors import ConfigError
from saekit.sae.mdl import MDLConfig, MDLSAE, reconstruction_loss, soft_description_length
from saekit.sae.mdl_control import controller_step, ema_step, shared_rms_step_
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train
from saekit.train.checkpoint import load_checkpoint_sae


def _massive_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four ordinary rows reconstructed with error 1 each, and one massive row reconstructed exactly
    except for an error of 10: x centred at 0 by construction."""
    x = torch.zeros(6, 2)
    x[:4] = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    x[4], x[5] = torch.tensor([100.0, 0.0]), torch.tensor([-100.0, 0.0])
    recon = x.clone()
    recon[:4] = 0.0  # error ‖x_i‖² = 1 on each ordinary row (per-row FVU 1)
    recon[4, 1] = 10.0  # error 100 on the massive row (per-row FVU 0.01)
    return x, recon


def test_reconstruction_loss_known_answers():
    x, recon = _massive_batch()
    # batch FVU: (4 + 100) / (4 + 2 * 10,000) — the massive rows hide the ordinary rows' total failure
    assert reconstruction_loss(x, recon, "batch").item() == pytest.approx(104 / 20004)
    # per-row FVU: every row counts once: (4 * 1 + 0.01 + 0) / 6
    assert reconstruction_loss(x, recon, "row").item() == pytest.approx(4.01 / 6)
    # clipped at 2 × the median centred norm (median squared norm 1 → cap 4): the massive rows weigh
    # 4 / 10,000 each, so they count as rows of squared norm 4
    w = 4 / 10_000
    want = (4 + w * 100) / (4 + 2 * w * 10_000)
    assert reconstruction_loss(x, recon, "clipped", clip_multiple=2.0).item() == pytest.approx(want)
    # without outliers, clipped is the batch FVU
    assert reconstruction_loss(x[:4], recon[:4], "clipped").item() == pytest.approx(1.0)


def test_robust_loss_gradient_reaches_ordinary_rows():
    """The failure issue 24 measured: under batch FVU an ordinary row's error barely moves the loss."""
    x, recon = _massive_batch()
    grads = {}
    for scale in ("batch", "row", "clipped"):
        r = recon.clone().requires_grad_(True)
        reconstruction_loss(x, r, scale, clip_multiple=2.0).backward()
        grads[scale] = r.grad[:4].norm().item()
    assert grads["row"] > 50 * grads["batch"] and grads["clipped"] > 50 * grads["batch"], grads


def test_controller_step_known_answers():
    c = torch.tensor(math.log(1e-3))
    assert controller_step(c, torch.tensor(64.0), 32.0, 0.1).item() == pytest.approx(c.item() + 0.1)  # +100 %
    assert controller_step(c, torch.tensor(48.0), 32.0, 0.1).item() == pytest.approx(c.item() + 0.05)
    assert controller_step(c, torch.tensor(16.0), 32.0, 0.1).item() == pytest.approx(c.item() - 0.05)
    assert controller_step(c, torch.tensor(3200.0), 32.0, 0.1).item() == pytest.approx(c.item() + 0.1)  # clipped
    assert controller_step(c, torch.tensor(32.0), 32.0, 0.1).item() == pytest.approx(c.item())  # fixed point


def test_config_checks():
    with pytest.raises(ConfigError, match="at most one of target_l0 and target_bits"):
        MDLConfig.from_dict({"d_in": 8, "d_sae": 16, "target_l0": 2, "target_bits": 20})
    with pytest.raises(ConfigError, match="target_l0 <= d_sae"):
        MDLConfig.from_dict({"d_in": 8, "d_sae": 16, "target_l0": 20})
    with pytest.raises(ConfigError):
        MDLConfig.from_dict({"d_in": 8, "d_sae": 16, "loss_scale": "median"})
    assert not hasattr(MDLSAE(MDLConfig(d_in=8, d_sae=16)), "log_dl_coef")  # no controller state unless asked


def test_thresholds_from_data_fire_at_the_requested_rate():
    x = planted_features(4096, 16, 32, avg_active=3, seed=0).x_ND
    sae = MDLSAE(MDLConfig(d_in=16, d_sae=64, init_l0=4.0, seed=0))
    sae.init_from_data(x)
    with torch.no_grad():
        rate_F = (sae.eval().encode(x).dense() != 0).float().mean(0)
    assert rate_F.sum().item() == pytest.approx(4.0, rel=0.02)  # mean L0 = init_l0
    assert rate_F.max().item() < 2 * 4.0 / 64 and rate_F.min().item() > 0.5 * 4.0 / 64  # every latent alike


def _train_to(target_l0: float, x, tmp_path, steps: int = 500, controller: str = "threshold"):
    sae = MDLSAE(MDLConfig(d_in=x.shape[1], d_sae=64, target_l0=target_l0, dl_coef=1e-3, controller_rate=0.05,
                           loss_scale="row", controller=controller, seed=0,
                           # steering λ needs the gates' own pressure upwards too (the surrogate on the encoder)
                           surrogate_to_encoder=controller == "dl_coef"))
    cfg = TrainConfig(total_steps=steps, batch_size=256, lr=3e-3, checkpoint_every=0, progress_bar=False,
                      log_every=steps, decay="none")
    return train(sae, TensorBatches(x, 256, seed=0), cfg, tmp_path / f"t{target_l0}-{controller}")


@pytest.mark.parametrize("controller", ["threshold", "dl_coef"])
def test_controller_reaches_the_requested_l0(tmp_path, one_thread, controller):
    """docs/RELIABILITY.md 6: a requested L0 is reached on held-out rows (planted data, true L0 ≈ 3)."""
    pd = planted_features(12288, 16, 32, avg_active=3, seed=0)
    x_tr, x_te = pd.x_ND[:8192], pd.x_ND[8192:]
    got = {}
    for target in (2.0, 6.0):
        res = _train_to(target, x_tr, tmp_path, controller=controller)
        with torch.no_grad():
            got[target] = float(res.sae.encode(x_te).l0().float().mean())
        assert got[target] == pytest.approx(target, rel=0.15), got
    assert got[6.0] > got[2.0] + 3


def test_controller_state_is_checkpointed_not_exported(tmp_path, one_thread):
    x = planted_features(2048, 16, 32, avg_active=3, seed=1).x_ND
    res = _train_to(3.0, x, tmp_path, steps=40, controller="dl_coef")
    live = load_checkpoint_sae(res.run_dir, fold=False).log_dl_coef
    assert not math.isclose(float(live), math.log(1e-3), abs_tol=1e-6)  # the controller moved λ
    assert math.isclose(float(live), float(res.sae.log_dl_coef), rel_tol=0, abs_tol=0)
    from saekit.sae.registry import load_sae

    loaded = load_sae(res.final_sae)  # the inference copy needs no λ: it loads with its default
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x[:64]).recon, res.sae(x[:64]).recon)


def test_surrogate_to_encoder_off_leaves_the_dl_gradient_to_the_threshold():
    """With surrogate_to_encoder false the DL estimate trains θ only; the encoder learns from values."""
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    grads = {}
    for flag in (True, False):
        sae = MDLSAE(MDLConfig(d_in=8, d_sae=32, init_threshold=0.2, surrogate_to_encoder=flag, seed=0)).train()
        out = sae(x)
        dl = sae.loss(x, out).parts["dl_bits"]
        p_fire_F = out.aux["p_fire_F"]
        act, val = soft_description_length(p_fire_F, sae.cfg.value_bits, x.shape[0])
        assert (act + val).item() == pytest.approx(dl, rel=1e-5)
        (act + val).backward()
        g_enc = 0.0 if sae.W_enc.grad is None else sae.W_enc.grad.abs().sum().item()  # None: no path at all
        grads[flag] = (g_enc, sae.log_threshold.grad.abs().sum().item())
    assert grads[True][0] > 0 and grads[False][0] == 0.0
    assert grads[False][1] > 0 and grads[False][1] == pytest.approx(grads[True][1], rel=1e-5)


def test_resume_continues_the_controller_exactly(tmp_path, one_thread):
    """λ is training state: a run stopped at step 15 and resumed ends where an uninterrupted one does."""
    from saekit.train.loop import Trainer

    x = planted_features(2048, 16, 32, avg_active=3, seed=2).x_ND

    def setup():
        sae = MDLSAE(MDLConfig(d_in=16, d_sae=32, target_l0=3.0, controller_rate=0.1, controller="dl_coef",
                               controller_ema=0.5, seed=0))
        cfg = TrainConfig(total_steps=30, batch_size=128, lr=3e-3, checkpoint_every=0, progress_bar=False,
                          log_every=10)
        return sae, TensorBatches(x, 128, seed=0), cfg

    whole = train(*setup(), tmp_path / "whole")
    sae, batches, cfg = setup()
    trainer = Trainer(sae, batches, cfg, tmp_path / "split")
    trainer.start()
    for _ in range(15):
        trainer.step()
    trainer.checkpoint()
    trainer.close()
    resumed = train(*setup(), tmp_path / "split", resume=True)
    assert resumed.start_step == 15
    a = load_checkpoint_sae(whole.run_dir, fold=False)
    b = load_checkpoint_sae(resumed.run_dir, fold=False)
    assert float(a.log_dl_coef) == float(b.log_dl_coef) and float(a.stat_ema) == float(b.stat_ema) > 0
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_ema_step_known_answers():
    none_yet = torch.tensor(-1.0, dtype=torch.float64)
    assert ema_step(none_yet, torch.tensor(10.0), 0.9).item() == 10.0  # the first value is taken as it is
    assert ema_step(torch.tensor(10.0, dtype=torch.float64), torch.tensor(20.0), 0.9).item() == pytest.approx(11.0)
    assert ema_step(torch.tensor(10.0, dtype=torch.float64), torch.tensor(20.0), 0.0).item() == 20.0  # no smoothing


def _plant_l0(shift: float, drift: float, step: int) -> float:
    """A toy gate population: mean L0 falls exponentially with a common log-threshold shift (slope 3 per
    unit, as a pre-activation tail does) while the optimizer drifts the gates by `drift` per step."""
    return 40.0 * math.exp(-3.0 * (shift + drift * step))


@pytest.mark.parametrize("drift", [0.0, 4e-3, -4e-3])
def test_threshold_controller_holds_the_target_against_drift(drift):
    """The threshold knob answers within the step, so the loop settles on the target although the
    gates drift by Adam's whole step size each step (the lr-4.4e-3 regime of issue 24): the knob's step
    must cancel the drift, so the steady relative error is drift / rate (4.4 % at worst at the default
    rate 0.1 and lr 4.4e-3), and 0 without drift."""
    knob = torch.tensor(0.0)
    for t in range(300):
        knob = controller_step(knob, torch.tensor(_plant_l0(float(knob), drift, t)), 24.0, 0.1)
    last = _plant_l0(float(knob), drift, 300)
    assert last == pytest.approx(24.0 * (1 - drift / 0.1), rel=0.005), last


def test_threshold_controller_moves_every_threshold_and_keeps_lambda():
    sae = MDLSAE(MDLConfig(d_in=8, d_sae=32, target_l0=2.0, controller_rate=0.1, dl_coef=1e-3, seed=0)).train()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    before = sae.log_threshold.detach().clone()
    loss = sae.loss(x, sae(x))
    l0 = loss.parts["l0"]
    sae.after_optimizer_step()
    step = 0.1 * max(-1.0, min(1.0, (l0 - 2.0) / 2.0))
    torch.testing.assert_close(sae.log_threshold.detach() - before, torch.full((32,), step), atol=1e-6, rtol=0)
    assert sae.dl_coef == 1e-3 and not hasattr(sae, "log_dl_coef")  # λ is the DL weight, not the knob
    sae.after_optimizer_step()  # no new training loss: no second step on the same measurement
    torch.testing.assert_close(sae.log_threshold.detach() - before, torch.full((32,), step), atol=1e-6, rtol=0)


def test_bits_target_steers_the_thresholds_on_the_batch_dl():
    sae = MDLSAE(MDLConfig(d_in=8, d_sae=32, target_bits=10.0, controller_rate=0.1, seed=0)).train()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    before = sae.log_threshold.detach().clone()
    bits = sae.loss(x, sae(x)).parts["dl_bits"]
    sae.after_optimizer_step()
    assert float(sae.batch_stat) == pytest.approx(bits, rel=1e-5)
    step = 0.1 * max(-1.0, min(1.0, (bits - 10.0) / 10.0))
    assert step != 0
    torch.testing.assert_close(sae.log_threshold.detach() - before, torch.full((32,), step), atol=1e-6, rtol=0)


def test_common_initial_threshold_gives_the_mean_l0_with_uneven_rates():
    x = planted_features(4096, 16, 32, avg_active=3, seed=0).x_ND
    sae = MDLSAE(MDLConfig(d_in=16, d_sae=64, init_l0=4.0, init_rates="common", seed=0))
    sae.init_from_data(x)
    assert torch.unique(sae.log_threshold.detach()).numel() == 1  # one threshold for every latent
    with torch.no_grad():
        rate_F = (sae.eval().encode(x).dense() != 0).float().mean(0)
    assert rate_F.sum().item() == pytest.approx(4.0, rel=0.02)  # mean L0 = init_l0
    assert rate_F.max().item() > 2 * rate_F.min().item()  # the rates differ across latents


def test_shared_rms_step_keeps_the_gradients_ratios():
    """Adam would move both thresholds by ~lr; one shared RMS keeps the 1 : 4 ratio of their gradients."""
    log_t, m, v = torch.zeros(2), torch.zeros(2), torch.tensor(-1.0, dtype=torch.float64)
    g = torch.tensor([1.0, 4.0])
    shared_rms_step_(log_t, g, m, v, lr=0.1)
    rms = math.sqrt((1 + 16) / 2)
    torch.testing.assert_close(log_t, -0.1 * 0.1 * g / rms)  # momentum (1 − β1) g over the shared RMS
    assert float(v) == pytest.approx(8.5)
    shared_rms_step_(log_t, g, m, v, lr=0.1)
    assert log_t[1].item() == pytest.approx(4 * log_t[0].item())


def test_shared_rms_thresholds_leave_adam_and_follow_their_gradient():
    sae = MDLSAE(MDLConfig(d_in=8, d_sae=32, dl_coef=1e-2, threshold_step="shared_rms", threshold_lr=0.05,
                           seed=0)).train()
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    before = sae.log_threshold.detach().clone()
    sae.loss(x, sae(x)).total.backward()
    g_F = sae.log_threshold.grad.clone()
    assert g_F.abs().sum() > 0
    sae.before_optimizer_step()
    assert sae.log_threshold.grad is None  # an optimizer built over every parameter skips it
    sae.after_optimizer_step()
    moved = before - sae.log_threshold.detach()
    want = 0.05 * 0.1 * g_F / g_F.pow(2).mean().sqrt()
    torch.testing.assert_close(moved, want, atol=1e-6, rtol=1e-4)


def test_default_lambda_depends_on_what_the_target_steers():
    assert MDLConfig(d_in=8, d_sae=16).lam == 1e-3  # fixed λ: the sparsity coefficient
    assert MDLConfig(d_in=8, d_sae=16, target_l0=2.0).lam == 0.1  # thresholds hold L0; λ shapes the spread
    assert MDLConfig(d_in=8, d_sae=16, target_l0=2.0, controller="dl_coef").lam == 1e-3  # λ's start
    assert MDLConfig(d_in=8, d_sae=16, target_l0=2.0, dl_coef=0.02).lam == 0.02  # an explicit λ wins
    assert MDLSAE(MDLConfig(d_in=8, d_sae=16, target_bits=10.0)).dl_coef == 0.1
