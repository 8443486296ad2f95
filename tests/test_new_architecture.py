"""A new architecture is one file: defined and registered here, in a test module, touching no library file.

`ReLUSAE` below is a plain L1 ReLU SAE with a dead-latent counter and a dead-latent resampling step
that edits weights from the batch it saw. It declares its policy on the class (`stat_buffers`,
`edits_weights_locally`, `decoder_is_affine`) and is then trained through `saekit.train.train` (also
through the distributed sync, on a one-rank gloo group), evaluated through `saekit.evaluate`, saved
and loaded through the registry, and held to the architecture contract over every context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import saekit
from saekit.config import param
from saekit.data.synthetic import planted_features
from saekit.sae.base import ForwardOutput, LossOutput, SAEConfig, SparseAutoencoder, SparseCode
from saekit.sae.registry import register
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, train
from saekit.train.distributed import DistributedSync

D_IN, D_SAE, BATCH, STEPS = 16, 48, 64, 12


@dataclass
class ReLUConfig(SAEConfig):
    l1_coef: float = param(1e-3, "weight of the L1 penalty on the codes", ge=0.0)
    dead_tokens: int = param(256, "tokens without firing after which a latent is resampled", ge=1)


@register
class ReLUSAE(SparseAutoencoder):
    """x_hat = ReLU((x - b_dec) W_enc + b_enc) W_dec + b_dec; dead latents resampled toward the worst row."""

    architecture = "test_relu"
    config_class = ReLUConfig
    edits_weights_locally = True  # resampling reads this process's batch
    stat_buffers = {"tokens_since_fired": "fired_any"}
    decoder_is_affine = True

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        W_FD = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        self.W_dec = nn.Parameter(W_FD / W_FD.norm(dim=1, keepdim=True))
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long), persistent=False)
        self._worst: Tensor | None = None

    def _encode_flat(self, x_ND: Tensor) -> SparseCode:
        z_NF = torch.relu((x_ND - self.b_dec) @ self.W_enc + self.b_enc)
        width = max(int((z_NF > 0).sum(1).max()) if z_NF.shape[0] else 0, 1)
        vals_NK, idx_NK = z_NF.topk(width, dim=1, sorted=False)
        return SparseCode(idx_NK, vals_NK, self.cfg.d_sae)

    def _decode_flat(self, code: SparseCode) -> Tensor:
        return code.dense() @ self.W_dec + self.b_dec

    def _forward_flat(self, x_ND: Tensor) -> ForwardOutput:
        code = self._encode_flat(x_ND)
        recon_ND = self._decode_flat(code)
        if self.training:
            with torch.no_grad():
                self.tokens_since_fired += x_ND.shape[0]
                self.tokens_since_fired[code.indices[code.values > 0]] = 0
                self._worst = x_ND[(x_ND - recon_ND).norm(dim=1).argmax()].clone()
        return ForwardOutput(recon_ND, code)

    def loss(self, x: Tensor, out: ForwardOutput) -> LossOutput:
        mse = (out.recon - x).pow(2).sum(-1).mean()
        l1 = out.code.values.abs().sum(-1).mean()
        return LossOutput(mse + self.cfg.l1_coef * l1, {"mse": mse.item(), "l1": l1.item()})

    def dead_fraction(self) -> float:
        return (self.tokens_since_fired >= self.cfg.dead_tokens).float().mean().item()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        dead = self.tokens_since_fired >= self.cfg.dead_tokens
        if self._worst is not None and dead.any():
            self.W_dec[dead] = self._worst - self.b_dec
            self.tokens_since_fired[dead] = 0
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


# Imported after the registration: the contract module parametrises over the registry as it is at import,
# so the whole contract (shapes, save/load, corruption, declared policy, contexts) runs on test_relu too.
import test_sae_contract as contract  # noqa: E402


class RecordingSync(DistributedSync):
    """The real distributed sync, counting the reductions it makes because of the SAE's declarations."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []
        self.broadcasts = 0

    def _all_reduce(self, t, op=dist.ReduceOp.SUM):
        self.ops.append(op)
        return super()._all_reduce(t, op)

    def broadcast_module(self, module) -> None:
        self.broadcasts += 1
        super().broadcast_module(module)


def _data() -> Tensor:
    return planted_features(1024, D_IN, 24, avg_active=3, seed=0).x_ND


class QuietReLUSAE(ReLUSAE):
    """The same SAE declaring that it edits no weights from local data (not registered)."""

    edits_weights_locally = False


def _train(tmp_path, name, sync=None, cls: type[ReLUSAE] = ReLUSAE):
    sae = cls(ReLUConfig(d_in=D_IN, d_sae=D_SAE, dead_tokens=128))
    cfg = TrainConfig.from_dict({"total_steps": STEPS, "batch_size": BATCH, "lr": 3e-3, "log_every": 1,
                                        "checkpoint_every": 0, "progress_bar": False})
    return train(sae, TensorBatches(_data(), BATCH, seed=1), cfg, tmp_path / name, sync=sync)


def test_registered_from_a_test_module_and_loadable(tmp_path):
    assert "test_relu" in saekit.architectures()
    sae = saekit.create_sae({"architecture": "test_relu", "d_in": D_IN, "d_sae": D_SAE, "l1_coef": 0.5})
    saekit.save_sae(sae, tmp_path / "sae", fold=False)
    loaded = saekit.load_sae(tmp_path / "sae")
    assert type(loaded) is ReLUSAE and loaded.cfg.l1_coef == 0.5
    assert torch.equal(loaded.W_dec, sae.W_dec)


def test_trains_and_evaluates_through_the_library(tmp_path, one_thread):
    res = _train(tmp_path, "run")
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == STEPS and lines[-1]["mse"] < lines[0]["mse"]
    assert lines[-1]["dead_fraction"] == pytest.approx(res.sae.dead_fraction())  # the SAE's own statistic
    trained = saekit.load_sae(tmp_path / "run")
    assert type(trained) is ReLUSAE
    x = _data()[:256]
    report = saekit.evaluate(trained, [x], description_length=True, dl_precisions=(4, 8))
    assert report["sae"]["architecture"] == "test_relu" and report["reconstruction"]["fvu"] < 1.0
    assert report["description_length"]["error_path"].startswith("affine")  # read from decoder_is_affine


def test_distributed_sync_reads_the_declarations(tmp_path, one_thread):
    """On a one-rank gloo group the real DistributedSync runs: the declared fired_any counter is
    reduced with MAX once per step, and edits_weights_locally broadcasts after every step."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        sync = RecordingSync()
        _train(tmp_path, "ddp", sync=sync)
        assert sync.ops.count(dist.ReduceOp.MAX) == STEPS
        quiet = RecordingSync()
        _train(tmp_path, "ddp-quiet", sync=quiet, cls=QuietReLUSAE)
        assert sync.broadcasts - quiet.broadcasts == STEPS
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("context", list(contract.CONTEXTS))
def test_keeps_the_contract_in_every_context(context):
    contract.test_same_codes_in_every_context("test_relu", context)
