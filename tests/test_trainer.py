"""The training loop: exact resume after SIGKILL, signals, non-finite policies, metrics (docs/RELIABILITY.md 15-23)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from train_helpers import BATCH, K, Recorder, make_data, make_setup, run_script

from saekit.errors import ConfigError, NonFiniteError, ShapeMismatchError
from saekit.train import Callback, MetricsLogger, TrainingInterrupted, latest_checkpoint, read_checkpoint, train


def assert_same_checkpoint(a, b):
    """Weights, Adam moments, scheduler, RNG, data position and training-only buffers bit-for-bit equal."""
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    for name in ("sae_tensors", "optimizer_tensors", "rng_tensors"):
        ta, tb = getattr(ca, name), getattr(cb, name)
        assert sorted(ta) == sorted(tb), name
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{name}[{k}] differs"
    for key in ("state", "scheduler", "data_position", "data_fingerprint", "train_config", "rng"):
        assert ca.trainer[key] == cb.trainer[key], key
    assert ca.optimizer_meta == cb.optimizer_meta


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 40-step run (checkpoints every 10) and its batch-hash sequence."""
    run_dir = tmp_path_factory.mktemp("reference")
    sae, batches, cfg = make_setup()
    rec = Recorder()
    result = train(sae, batches, cfg, run_dir, callbacks=[rec])
    return run_dir, rec.steps, result


def test_fresh_run_writes_the_run_folder(reference_run):
    run_dir, steps, result = reference_run
    assert result.start_step == 0 and result.steps_run == 40 and result.state.step == 40
    assert [s for s, _, _ in steps] == list(range(1, 41))
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "latest", "step-00000010", "step-00000020", "step-00000030", "step-00000040"}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000040"
    assert (run_dir / "final_sae" / "cfg.json").exists()
    assert (run_dir / "final_sae" / "sae_weights.safetensors").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["total_steps"] == 40 and config["sae"]["architecture"] == "test_toy_topk"
    assert config["input_scale"] == pytest.approx(result.state.input_scale)
    ckpt = read_checkpoint(run_dir)
    assert {"exp_avg/W_enc", "exp_avg_sq/W_enc", "step/W_enc"} <= set(ckpt.optimizer_tensors)
    assert ckpt.rng_tensors["torch_cpu"].dtype == torch.uint8
    assert "tokens_since_fired" in ckpt.sae_tensors
    assert all(p.suffix in (".json", ".safetensors") for p in ckpt.path.iterdir())


def test_metrics_jsonl(reference_run):
    run_dir, _, _ = reference_run
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30, 35, 40]
    for r in lines:
        assert {"loss", "mse", "fvu", "l0", "dead_fraction", "tokens_per_s", "lr", "grad_norm",
                "nonfinite_skipped", "tokens"} <= set(r)
        assert r["lr"] > 0
    assert lines[-1]["fvu"] < lines[0]["fvu"]  # it learns
    assert lines[0]["lr"] == pytest.approx(3e-3)  # step 5 is the first after a 5-step warm-up


class _Measure(Callback):
    """Measures L0 and dead latents from each step's codes, independently of MetricsLogger."""

    def __init__(self, d_sae: int):
        self.since_fired = torch.zeros(d_sae, dtype=torch.long)
        self.l0: dict[int, float] = {}
        self.dead: dict[int, torch.Tensor] = {}

    def on_step_end(self, run, info) -> None:
        nonzero_BK = info.out.code.values != 0
        self.l0[info.step] = nonzero_BK.sum(-1).double().mean().item()
        self.since_fired += nonzero_BK.shape[0]
        self.since_fired[info.out.code.indices[nonzero_BK].unique()] = 0
        self.dead[info.step] = self.since_fired.clone()


def test_logged_l0_and_dead_fraction_are_the_measured_ones(tmp_path):
    """The logged l0 is the batch's mean count of non-zero codes (below k when ReLU zeroes some), and
    the dead fraction counts latents silent for `dead_window_tokens` rows (8 are forced silent)."""
    sae, batches, cfg = make_setup(total_steps=12, log_every=4, checkpoint_every=0)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # never fire: no gradient reaches them through the ReLU
        sae.b_enc[8:] = -2.0  # some top-k values are zeroed, so l0 < k
    measure = _Measure(sae.cfg.d_sae)
    logger = MetricsLogger(tmp_path / "dead.jsonl", every=4, dead_window_tokens=3 * BATCH)
    train(sae, batches, cfg, tmp_path / "run", callbacks=[measure, logger])
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dead = [json.loads(ln) for ln in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in dead] == [4, 8, 12]
    for r, d in zip(lines, dead):
        assert r["l0"] == pytest.approx(measure.l0[r["step"]], abs=1e-6)
        assert d["dead_fraction"] == pytest.approx((measure.dead[r["step"]] >= 3 * BATCH).double().mean().item())
        assert d["dead_fraction"] >= 8 / sae.cfg.d_sae
    assert min(measure.l0.values()) < K  # the l0 comparison is not against a constant k
    assert lines[0]["dead_fraction"] == 0.0  # the default window (10M rows) has not passed


def test_sigkill_then_resume_is_bit_exact(reference_run, tmp_path):
    ref_dir, ref_steps, _ = reference_run
    proc = run_script({"run_dir": str(tmp_path), "kill_at_step": 23})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(tmp_path).name == "step-00000020"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2')  # a line the kill cut short
    sae, batches, cfg = make_setup()
    rec = Recorder()
    result = train(sae, batches, cfg, tmp_path, callbacks=[rec], resume=True)
    assert result.start_step == 20 and result.steps_run == 20
    # the data the resumed run saw is the data the uninterrupted run saw (epoch wrap included)
    assert rec.steps == ref_steps[20:]
    assert_same_checkpoint(ref_dir / "checkpoints" / "step-00000040", tmp_path / "checkpoints" / "step-00000040")
    ref_final = (ref_dir / "final_sae" / "sae_weights.safetensors").read_bytes()
    assert (tmp_path / "final_sae" / "sae_weights.safetensors").read_bytes() == ref_final
    # metrics past the checkpoint written by the killed process were dropped, then rewritten once
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]


def test_sigkill_then_resume_is_bit_exact_for_topk_with_auxk(tmp_path):
    ref_dir = tmp_path / "ref"
    sae, batches, cfg = make_setup(arch="topk", total_steps=30)
    ref = Recorder()
    train(sae, batches, cfg, ref_dir, callbacks=[ref])
    run_dir = tmp_path / "killed"
    proc = run_script({"run_dir": str(run_dir), "kill_at_step": 14, "cfg": {"arch": "topk", "total_steps": 30}})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = read_checkpoint(run_dir)
    assert ckpt.state.step == 10 and int(ckpt.sae_tensors["tokens_since_fired"].max()) >= 96  # dead latents exist
    sae, batches, cfg = make_setup(arch="topk", total_steps=30)
    rec = Recorder()
    result = train(sae, batches, cfg, run_dir, callbacks=[rec], resume=True)
    assert result.steps_run == 20 and rec.steps == ref.steps[10:]
    assert_same_checkpoint(ref_dir / "checkpoints" / "step-00000030", run_dir / "checkpoints" / "step-00000030")
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "auxk" in metrics[-1] and metrics[-1]["dead_fraction"] is not None


def test_sigint_in_process_checkpoints_restores_handlers_and_resumes_exactly(reference_run, tmp_path):
    ref_dir, _, _ = reference_run
    seen = []
    previous = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
    try:
        sae, batches, cfg = make_setup()
        rec = Recorder({7: lambda run, info: os.kill(os.getpid(), signal.SIGINT)})
        with pytest.raises(TrainingInterrupted) as exc:
            train(sae, batches, cfg, tmp_path, callbacks=[rec])
        assert exc.value.code == 130 and exc.value.checkpoint.name == "step-00000007"
        assert [s for s, _, _ in rec.steps] == list(range(1, 8))  # stopped within the step
        os.kill(os.getpid(), signal.SIGINT)  # our own handler is back in place
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert latest_checkpoint(tmp_path).name == "step-00000007"
    assert read_checkpoint(tmp_path).state.step == 7
    sae, batches, cfg = make_setup()
    result = train(sae, batches, cfg, tmp_path, resume=True)
    assert result.steps_run == 33
    assert_same_checkpoint(ref_dir / "checkpoints" / "step-00000040", tmp_path / "checkpoints" / "step-00000040")


def test_sigint_subprocess_exits_nonzero_with_complete_checkpoint(tmp_path):
    proc = run_script({"run_dir": str(tmp_path), "sigint_at_steps": [12]})
    assert proc.returncode == 130, proc.stderr[-2000:]
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.path.name == "step-00000012" and ckpt.state.step == 12
    assert ckpt.trainer["data_position"]["offset"] > 0


def test_sigterm_exits_143(tmp_path):
    sae, batches, cfg = make_setup()
    rec = Recorder({3: lambda run, info: os.kill(os.getpid(), signal.SIGTERM)})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as exc:
        train(sae, batches, cfg, tmp_path, callbacks=[rec])
    assert exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_second_sigint_aborts_without_touching_the_last_checkpoint(tmp_path):
    sae, batches, cfg = make_setup()
    rec = Recorder({13: lambda run, info: [os.kill(os.getpid(), signal.SIGINT) for _ in range(2)]})
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(sae, batches, cfg, tmp_path, callbacks=[rec])
    assert signal.getsignal(signal.SIGINT) is previous
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000010"]
    assert read_checkpoint(tmp_path).state.step == 10


def _nan_data(step: int, rows: list[int], value: float = float("nan")):
    """Data where training step `step` (1-based, unshuffled, after 2 warm-up batches) has bad rows."""
    x = make_data()
    for r in rows:
        x[(2 + step - 1) * BATCH + r] = value
    return x


def test_nan_activations_raise_naming_step_and_rows(tmp_path):
    sae, batches, cfg = make_setup(data=_nan_data(3, [3, 7]), shuffle=False)
    with pytest.raises(NonFiniteError, match=r"training step 3: non-finite activations in rows \[3, 7\]"):
        train(sae, batches, cfg, tmp_path)


def test_nan_in_warmup_batch_raises(tmp_path):
    x = make_data()
    x[5, 2] = float("inf")
    sae, batches, cfg = make_setup(data=x, shuffle=False)
    with pytest.raises(NonFiniteError, match=r"warm-up batch 0.*rows \[5\]"):
        train(sae, batches, cfg, tmp_path)


def test_nonfinite_loss_raises(tmp_path):
    sae, batches, cfg = make_setup(data=_nan_data(2, [4], value=1e30), shuffle=False)
    with pytest.raises(NonFiniteError, match=r"training step 2: non-finite loss \(rows \[4\]"):
        train(sae, batches, cfg, tmp_path)


class Snapshots:
    """Bitwise copies of parameters, buffers and Adam state after every step."""

    def __init__(self):
        self.at = {}

    def __call__(self, run, info):
        opt_state = {f"{k}/{i}": v.clone() for i, st in run.optimizer.state_dict()["state"].items()
                     for k, v in st.items()}
        tensors = {n: t.detach().clone() for n, t in [*run.sae.named_parameters(), *run.sae.named_buffers()]}
        self.at[info.step] = (tensors, opt_state, info.skipped)


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_skip_policy_leaves_params_and_adam_state_bitwise_unchanged(tmp_path):
    sae, batches, cfg = make_setup(data=_nan_data(6, [0, 31]), shuffle=False, nonfinite="skip", total_steps=10)
    snap = Snapshots()
    rec = Recorder({s: snap for s in range(1, 11)})
    result = train(sae, batches, cfg, tmp_path, callbacks=[rec])
    assert [s for s, _, skipped in rec.steps if skipped] == [6]
    (p5, o5, _), (p6, o6, skipped6), (p7, o7, _) = snap.at[5], snap.at[6], snap.at[7]
    assert skipped6 and _equal(p5, p6) and _equal(o5, o6)
    assert not _equal(p6, p7) and not _equal(o6, o7)  # training goes on afterwards
    assert result.state.nonfinite_skipped == 1 and result.state.step == 10
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["nonfinite_skipped"] == 1


def _poison(flag: bool):
    def act(run, info):
        run.sae.poison = flag
    return act


def test_nan_gradient_is_skipped_bitwise(tmp_path):
    sae, batches, cfg = make_setup(nonfinite="skip", total_steps=8)
    snap = Snapshots()
    actions = {s: snap for s in range(1, 9)}
    rec = Recorder(actions)
    rec.actions[4] = lambda run, info: (snap(run, info), _poison(True)(run, info))
    rec.actions[5] = lambda run, info: (snap(run, info), _poison(False)(run, info))
    result = train(sae, batches, cfg, tmp_path, callbacks=[rec])
    (p4, o4, _), (p5, o5, skipped5) = snap.at[4], snap.at[5]
    assert skipped5 and _equal(p4, p5) and _equal(o4, o5)  # dead-latent counter restored too
    assert not snap.at[6][2] and result.state.nonfinite_skipped == 1


def test_nan_gradient_raises_by_default(tmp_path):
    sae, batches, cfg = make_setup(total_steps=8)
    rec = Recorder({2: _poison(True)})
    with pytest.raises(NonFiniteError, match="training step 3: non-finite gradient"):
        train(sae, batches, cfg, tmp_path, callbacks=[rec])


def test_consecutive_nonfinite_steps_abort_leaving_last_good_checkpoint(tmp_path):
    sae, batches, cfg = make_setup(nonfinite="skip", max_consecutive_nonfinite=3, checkpoint_every=5, total_steps=20)
    rec = Recorder({7: _poison(True)})
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps"):
        train(sae, batches, cfg, tmp_path, callbacks=[rec])
    assert [s for s, _, skipped in rec.steps if skipped] == [8, 9]  # the 3rd (step 10) raised
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000005"]
    assert read_checkpoint(tmp_path).state.nonfinite_skipped == 0


def test_fresh_run_refuses_a_folder_with_checkpoints(reference_run):
    run_dir, _, _ = reference_run
    sae, batches, cfg = make_setup()
    with pytest.raises(ConfigError, match="resume=True"):
        train(sae, batches, cfg, run_dir)


def test_input_validation(tmp_path):
    sae, batches, cfg = make_setup(sae_overrides={"d_in": 8})
    with pytest.raises(ShapeMismatchError, match="d_in=8"):
        train(sae, batches, cfg, tmp_path)
    sae, batches, cfg = make_setup(batch_size=64)
    with pytest.raises(ConfigError, match="batch_size"):
        train(sae, batches, cfg, tmp_path)


def test_auto_resume_of_a_finished_run_runs_nothing(reference_run):
    run_dir, _, _ = reference_run
    sae, batches, cfg = make_setup()
    result = train(sae, batches, cfg, run_dir, resume="auto")
    assert result.start_step == 40 and result.steps_run == 0


def test_nan_in_a_store_names_document_and_position(tmp_path):
    """Promise 22: the error traces a bad row to its document and token position, through the store's
    batch source (a row subset of it, as the train stage uses), not only to the in-batch row."""
    from support.planted import PlantedSource
    from support.runs import WORDS, llm_spec, synthetic_docs

    from saekit.store.reader import ActivationStore
    from saekit.store.writer import StoreConfig, cache_activations

    source = PlantedSource(llm_spec("m", "h", 16), len(WORDS) + 2, every=1000, scale=float("nan"))  # doc 0, pos 1
    cache_activations(source, synthetic_docs(30, min_words=4, max_words=8), tmp_path / "store",
                      StoreConfig(docs_per_shard=10))
    store = ActivationStore(tmp_path / "store")
    bad_row = int(((store.meta("doc_id") == 0) & (store.meta("pos") == 1)).nonzero())
    sae, _, cfg = make_setup(data=make_data(64)[:, :16], total_steps=400, batch_size=16,
                             normalize_activations="none")
    batches = store.batches(16, seed=0, rows=torch.arange(len(store)))
    with pytest.raises(NonFiniteError, match=rf"store row {bad_row}: doc 0, position 1"):
        train(sae, batches, cfg, tmp_path / "run")


def test_nan_in_a_tensor_names_the_data_row(tmp_path):
    """In-memory data has no documents: the error names the row of the data tensor."""
    x = make_data()
    x[(2 + 3 - 1) * BATCH + 7] = float("nan")  # unshuffled: step 3, in-batch row 7
    sae, batches, cfg = make_setup(data=x, shuffle=False)
    with pytest.raises(NonFiniteError, match=rf"rows \[7\] \(data rows {(2 + 3 - 1) * BATCH + 7}\)"):
        train(sae, batches, cfg, tmp_path)
