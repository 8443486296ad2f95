"""What `saekit.train(...)` adds around the bare step, made cheaper without changing a bit:
the same loss curve and weights as the plain formulas, final_sae/ linked from the final checkpoint,
large files written past the page cache, format-1 checkpoints still resumed."""

from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch

from saekit import artifacts as A
from saekit import direct_write
from saekit.artifacts import MANIFEST, load_tensors, read_json, sha256_file, verify_manifest, write_tensors
from saekit.sae.kernels import grad_sumsq, native
from saekit.sae.registry import WEIGHTS_FILE, load_sae, save_sae
from saekit.sae.topk import TopKConfig, TopKSAE
from saekit.store.batches import TensorBatches, epoch_permutation
from saekit.train import Callback, TrainConfig, read_checkpoint, train
from saekit.train import checkpoint as ck
from saekit.train.callbacks import fvu
from saekit.train.loop import fold_in_place
from saekit.train.schedules import lr_at
from saekit.train.step import grad_norm

D_IN, D_SAE, K, B, STEPS = 32, 128, 4, 64, 8


def _data(scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16 * B, D_IN, generator=g) * scale + 1.0  # 16 batches: no epoch boundary in a run


def _reference(x_ND: torch.Tensor, cfg: TrainConfig):
    """The public path's maths written out with the formulas it used before it was made cheaper:
    advanced-index gather, warm-up rows through float64, clip_grads_with_norm_ with the gradient norm
    (`grad_norm`: the kernels' sums of squares, within 1e-5 of torch's get_total_norm every step), fused Adam
    on the schedule. Returns (losses, the SAE, how many steps clipped)."""
    cfg = cfg.resolved(D_SAE)
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    perm = epoch_permutation(len(x_ND), 0, 0)
    batches = [x_ND[perm[i * B:(i + 1) * B]].float() for i in range(len(x_ND) // B)]
    n_first = max(cfg.init_batches, cfg.norm_batches if cfg.normalize_activations != "none" else 0)
    first = [b.double() for b in batches[:n_first]]
    scale = 1.0
    if cfg.normalize_activations != "none":
        scale = (D_IN / torch.cat(first).pow(2).sum(-1).mean().item()) ** 0.5
        sae.set_input_scale(scale)
    sae.init_from_data((torch.cat(first[: cfg.init_batches]) * scale).to(torch.float32))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    read, losses, clipped = len(first), [], 0
    torch.use_deterministic_algorithms(True)
    try:
        for step in range(cfg.total_steps):
            x = batches[read + step] * scale if scale != 1.0 else batches[read + step]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.total_steps, cfg.warmup_steps, cfg.decay, cfg.decay_fraction)
            out = sae(x)
            loss = sae.loss(x, out)
            losses.append(float(loss.total.detach()))
            opt.zero_grad(set_to_none=True)
            with grad_sumsq.collecting():  # the norm from the kernels' by-products, checked against torch's
                loss.total.backward()
                sae.before_optimizer_step()
                grads = [p.grad for p in sae.parameters() if p.grad is not None]
                norm = grad_norm(grads)
            torch.testing.assert_close(norm, torch.nn.utils.get_total_norm(grads), rtol=1e-5, atol=0)
            if cfg.grad_clip is not None and float(cfg.grad_clip / (norm + 1e-6)) < 1.0:
                clipped += 1
                torch.nn.utils.clip_grads_with_norm_(list(sae.parameters()), cfg.grad_clip, norm)
            opt.step()
            sae.after_optimizer_step()
    finally:
        torch.use_deterministic_algorithms(False)
    return losses, sae, clipped


@pytest.mark.parametrize("normalize, clip", [("none", 45.0), ("expected_average_only_in", 4.5)])
def test_public_train_gives_the_reference_loss_curve_and_weights_bit_for_bit(tmp_path, normalize, clip):
    """`clip` sits inside the run's gradient norms (~63 → 43 raw, ~7 → 4.2 normalised), so some steps clip."""
    x_ND = _data()
    cfg = TrainConfig(total_steps=STEPS, batch_size=B, log_every=1, progress_bar=False, checkpoint_every=3,
                      normalize_activations=normalize, norm_batches=2, lr=3e-2, grad_clip=clip)
    losses, ref, clipped = _reference(x_ND, cfg)
    assert 0 < clipped < STEPS  # both branches of the clip are exercised
    result = train(TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0)), TensorBatches(x_ND, B), cfg, tmp_path)
    logged = [json.loads(ln)["loss"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == losses
    fold_in_place(ref)  # what train() does to the SAE it exports (a no-op without a scale)
    for exported in (result.sae, load_sae(tmp_path)):  # the SAE train() leaves folded in place, and final_sae/
        for (name, a), (_, b) in zip(ref.state_dict().items(), exported.state_dict().items()):
            assert torch.equal(a, b), name


def _short_run(tmp_path, **kw):
    cfg = TrainConfig(total_steps=6, batch_size=B, progress_bar=False, checkpoint_every=4, **kw)
    return train(TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0)), TensorBatches(_data(), B), cfg, tmp_path)


def test_final_sae_weights_are_the_final_checkpoint_file(tmp_path):
    result = _short_run(tmp_path)
    weights, ckpt = result.final_sae / WEIGHTS_FILE, tmp_path / "checkpoints" / "step-00000006"
    assert os.path.samefile(weights, ckpt / ck.SAE_STATE)  # serialised and hashed once
    assert read_json(result.final_sae / MANIFEST)["files"][WEIGHTS_FILE] == sha256_file(weights)
    verify_manifest(result.final_sae)
    state = load_tensors(weights)
    assert set(state) == set(result.sae.state_dict()) and "tokens_since_fired" not in state
    assert set(load_tensors(ckpt / ck.SAE_BUFFERS)) == {"tokens_since_fired"}
    for name, t in load_sae(tmp_path).state_dict().items():
        assert torch.equal(t, result.sae.state_dict()[name]), name
    # the checkpoint going away (pruned, deleted) leaves final_sae/ whole
    import shutil

    shutil.rmtree(tmp_path / "checkpoints")
    assert set(load_sae(tmp_path).state_dict()) == set(state)


def test_final_sae_is_written_when_it_differs_from_the_checkpoint(tmp_path):
    result = _short_run(tmp_path, normalize_activations="expected_average_only_in")
    weights = result.final_sae / WEIGHTS_FILE
    assert not os.path.samefile(weights, tmp_path / "checkpoints" / "step-00000006" / ck.SAE_STATE)  # folded
    verify_manifest(result.final_sae)
    load_sae(tmp_path)


def test_final_sae_falls_back_to_writing_when_links_are_refused(tmp_path, monkeypatch):
    def no_links(*_a, **_k):
        raise OSError(errno.EPERM, "hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    result = _short_run(tmp_path)
    weights = result.final_sae / WEIGHTS_FILE
    assert not os.path.samefile(weights, tmp_path / "checkpoints" / "step-00000006" / ck.SAE_STATE)
    verify_manifest(result.final_sae)
    for name, t in load_sae(tmp_path).state_dict().items():
        assert torch.equal(t, result.sae.state_dict()[name]), name


def test_save_sae_refuses_to_link_a_file_with_other_tensors(tmp_path):
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    other = tmp_path / "other.safetensors"
    sha = write_tensors(other, {"W_enc": torch.zeros(3)})
    save_sae(sae, tmp_path / "sae", weights_from=(other, sha))
    assert not os.path.samefile(tmp_path / "sae" / WEIGHTS_FILE, other)
    assert torch.equal(load_sae(tmp_path / "sae").W_enc, sae.W_enc)


def _as_format_1(folder) -> None:
    """Rewrite a checkpoint as the previous format wrote it: every SAE tensor in sae_state.safetensors."""
    tensors = {**load_tensors(folder / ck.SAE_STATE), **load_tensors(folder / ck.SAE_BUFFERS)}
    (folder / ck.SAE_STATE).unlink()
    (folder / ck.SAE_BUFFERS).unlink()
    A.save_tensors(folder / ck.SAE_STATE, tensors)
    trainer = read_json(folder / ck.TRAINER_JSON)
    trainer["format_version"] = 1
    A.atomic_write_json(folder / ck.TRAINER_JSON, trainer)
    files = [f for f in read_json(folder / MANIFEST)["files"] if f != ck.SAE_BUFFERS]
    A.write_manifest(folder, files, {"kind": "saekit-train-checkpoint"})


def test_a_format_1_checkpoint_still_resumes_exactly(tmp_path):
    full = _short_run(tmp_path / "full")
    cfg = TrainConfig(total_steps=6, batch_size=B, progress_bar=False, checkpoint_every=4)
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    with pytest.raises(SystemExit):  # stop after step 4's checkpoint, as a kill would
        train(sae, TensorBatches(_data(), B), cfg, tmp_path / "cut", callbacks=[_StopAt(4)])
    _as_format_1(tmp_path / "cut" / "checkpoints" / "step-00000004")
    old = read_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000004")
    assert "tokens_since_fired" in old.sae_tensors
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0))
    resumed = train(sae, TensorBatches(_data(), B), cfg, tmp_path / "cut", resume=True)
    assert resumed.steps_run == 2
    for name, t in full.sae.state_dict().items():
        assert torch.equal(t, resumed.sae.state_dict()[name]), name


class _StopAt(Callback):
    """Raise SystemExit once the checkpoint of `step` is written (the run stops like a killed one)."""

    def __init__(self, step: int):
        self.step = step

    def on_checkpoint(self, run, path) -> None:
        if run.state.step == self.step:
            raise SystemExit(137)


# -- files past the page cache -----------------------------------------------------------------------
def _big() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(direct_write.MIN_SIZE // 4 + 12345, generator=g),
            "b": torch.randint(0, 9, (333, 1001), generator=g), "c": torch.randn(3, generator=g).bfloat16()}


def _same(path, tensors, sha) -> None:
    assert sha == sha256_file(path)
    back = load_tensors(path, sha)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    assert not list(path.parent.glob(".*.tmp"))


def test_large_tensor_files_round_trip_past_the_page_cache(tmp_path):
    tensors = _big()
    sha = write_tensors(tmp_path / "big.safetensors", tensors)
    _same(tmp_path / "big.safetensors", tensors, sha)
    assert os.path.getsize(tmp_path / "big.safetensors") % direct_write.ALIGN != 0  # the padded tail was cut


def test_o_direct_refused_at_open_writes_through_the_page_cache(tmp_path, monkeypatch):
    real, seen = os.open, []

    def refuse_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            seen.append(path)
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", refuse_direct)
    tensors = _big()
    sha = write_tensors(tmp_path / "big.safetensors", tensors)
    monkeypatch.setattr(os, "open", real)
    assert seen or not hasattr(os, "O_DIRECT")
    _same(tmp_path / "big.safetensors", tensors, sha)


def _fail_second_write(monkeypatch, error: OSError) -> tuple[dict, object]:
    """Make the second `os.write` raise `error`; returns the call counter and the real `os.write`."""
    real, calls = os.write, {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return calls, real


def test_o_direct_refused_midway_writes_the_rest_through_the_page_cache(tmp_path, monkeypatch):
    calls, real = _fail_second_write(monkeypatch, OSError(errno.EINVAL, "refused"))
    tensors = _big()
    sha = write_tensors(tmp_path / "big.safetensors", tensors)
    monkeypatch.setattr(os, "write", real)
    assert calls["n"] > 2
    _same(tmp_path / "big.safetensors", tensors, sha)


def test_a_failed_large_write_propagates_and_leaves_no_temporary(tmp_path, monkeypatch):
    _, real = _fail_second_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        write_tensors(tmp_path / "big.safetensors", _big())
    monkeypatch.setattr(os, "write", real)
    assert list(tmp_path.iterdir()) == []


# -- cheaper pieces, same values --------------------------------------------------------------------
def test_fvu_is_the_plain_float64_expression():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(300, 17, generator=g).to(dtype)
        r = (x.float() + 0.3 * torch.randn(300, 17, generator=g)).to(dtype)
        xd, rd = x.double(), r.double()
        plain = float((xd - rd).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())
        assert fvu(x, r) == plain
    assert fvu(x, x) == 0.0


def test_tensor_batches_gather_the_rows_advanced_indexing_gives():
    x = torch.randn(1000, 8)
    a, b = TensorBatches(x, 64, seed=3), TensorBatches(x, 64, seed=3)
    for _ in range(20):  # crosses epochs
        got = a.next_batch()
        idx = b.next_global_indices()
        assert torch.equal(got, x[idx])


# -- the gradient norm from the kernels' sums of squares (saekit.sae.kernels.grad_sumsq) --------------------
needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch fallbacks are used")


def _final_grads(sae: TopKSAE, x_ND: torch.Tensor) -> list[torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    sae.loss(x_ND, sae(x_ND)).total.backward()
    sae.before_optimizer_step()
    return [p.grad for p in sae.parameters()]


@needs_native
def test_grad_norm_uses_the_kernels_sums_and_agrees_with_torch(tmp_path):
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0)).train()
    with grad_sumsq.collecting():
        grads = _final_grads(sae, _data()[:B])
        found = {name: grad_sumsq.lookup(p.grad) is not None for name, p in sae.named_parameters()}
        norm = grad_norm(grads)
    assert found == {"W_enc": True, "W_dec": True, "b_enc": False, "b_dec": False}
    torch.testing.assert_close(norm, torch.nn.utils.get_total_norm(grads), rtol=1e-5, atol=0)
    assert grad_sumsq.lookup(grads[0]) is None  # forgotten outside the block: nothing kept alive
    assert torch.equal(grad_norm(grads), torch.nn.utils.get_total_norm(grads))  # no sums: exactly torch's


@needs_native
@pytest.mark.parametrize("where", ["W_enc", "W_dec", "b_enc"])
def test_a_nan_in_any_gradient_makes_the_norm_nonfinite(where):
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, seed=0)).train()
    with grad_sumsq.collecting():
        grads = _final_grads(sae, _data()[:B])
        getattr(sae, where).grad.view(-1)[7] = float("nan")  # an in-place edit: the recorded sum expires
        assert not torch.isfinite(grad_norm(grads))


@needs_native
def test_nan_written_by_the_kernels_reaches_their_sums():
    idx = torch.tensor([[0, 2], [1, 2]])
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    M = torch.ones(2, 5)
    M[1, 3] = float("nan")
    with grad_sumsq.collecting():
        out = native.sparse_t_matmul(idx, w, M, 3, transposed=True)
        assert math.isnan(grad_sumsq.lookup(out))
        g, W = torch.ones(4, 8), torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        g[2, 5] = float("inf")
        assert native.remove_parallel_rows_(g, W)
        assert not math.isfinite(grad_sumsq.lookup(g))


@needs_native
def test_kernel_sums_are_exact_enough_and_the_same_on_any_thread_count():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 700, (300, 8), generator=g)
    w, M = torch.randn(300, 8, generator=g), torch.randn(300, 48, generator=g)
    sums = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with grad_sumsq.collecting():
                out = native.sparse_t_matmul(idx, w, M, 700, transposed=True)
                sums.append(grad_sumsq.lookup(out))
        finally:
            torch.set_num_threads(before)
    assert sums[0] == sums[1]
    assert sums[0] == pytest.approx(float(out.double().pow(2).sum()), rel=1e-6)


def test_a_record_answers_only_for_the_same_unchanged_tensor():
    t = torch.ones(4, 4)
    with grad_sumsq.collecting():
        grad_sumsq.record(t, 16.0)
        assert grad_sumsq.lookup(t) == 16.0 and grad_sumsq.lookup(t.detach()) == 16.0  # an alias, same values
        assert grad_sumsq.lookup(t[:2]) is None and grad_sumsq.lookup(t.t()) is None and grad_sumsq.lookup(t.clone()) is None
        t.mul_(2)
        assert grad_sumsq.lookup(t) is None  # written since
        grad_sumsq.record(t, 64.0)
        assert grad_sumsq.lookup(t) == 64.0
        grad_sumsq.forget()
        assert grad_sumsq.lookup(t) is None
    grad_sumsq.record(t, 1.0)  # not collecting: nothing is kept
    with grad_sumsq.collecting():
        assert grad_sumsq.lookup(t) is None
