"""Validation during training (issue 26) and the trained SAE object meaning what the saved one means
(issue 24, item 3).

A tiny planted run trained to memorise (64 noisy rows, a 256-latent SAE, 300 steps at a high
learning rate: 150 epochs) is the overfitting case: its validation FVU turns up while its training FVU keeps falling, and
the generalisation warning fires; the same SAE on 4,096 rows generalises and stays silent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import make_data, make_setup

from saekit.artifacts import read_json
from saekit.errors import ConfigError, ResumeMismatchError
from saekit.eval.report import attach_generalisation, evaluate_sae
from saekit.eval.report_text import format_report
from saekit.layout import METRICS, TRAIN_SUMMARY, VAL_CURVE
from saekit.sae.registry import load_sae
from saekit.store.batches import TensorBatches
from saekit.train import TrainConfig, ValidationSet, generalisation_gap, read_checkpoint, train
from saekit.train.callbacks import Callback

_PLANTED = make_data(4096 + 512, seed=0)  # one planted dictionary, plus per-row noise to memorise
ALL_ND = _PLANTED + 0.5 * torch.randn(_PLANTED.shape, generator=torch.Generator().manual_seed(1))
VAL_ND = ALL_ND[-512:]  # held-out rows: the same planted features, rows never trained on
MEMORISE = dict(total_steps=300, lr=2e-2, eval_every=20, log_every=20, checkpoint_every=0,
                sae_overrides={"d_sae": 256})


def memorise_setup(n_rows: int = 64, **overrides):
    kw = {**MEMORISE, **overrides}
    return make_setup(data=ALL_ND[:n_rows], **kw)


def val_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / METRICS).read_text().splitlines()) if "val_fvu" in r]


class FailAt(Callback):
    """Raises at the end of a given step (a crash between checkpoints)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, run, info) -> None:
        if info.step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def same_tensors(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def final_tensors(path: Path) -> dict:
    sae = load_sae(path)
    return {**dict(sae.named_parameters()), **dict(sae.named_buffers())}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny training loops: one thread avoids oversubscription on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def memorised(_one_thread, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("memorise")
    sae, batches, cfg = memorise_setup()
    return run_dir, train(sae, batches, cfg, run_dir, val_batches=VAL_ND)


# -- issue 26: the validation curve -----------------------------------------------------------------
def test_memorising_run_val_fvu_rises_while_train_fvu_falls(memorised):
    run_dir, result = memorised
    rows = val_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(20, 301, 20))
    best = min(range(len(rows)), key=lambda i: rows[i]["val_fvu"])
    assert best < len(rows) - 3, "the validation minimum should come well before the end"
    after = rows[best:]
    assert after[-1]["val_fvu"] > 1.05 * after[0]["val_fvu"]  # validation gets worse ...
    assert after[-1]["train_fvu"] < 0.1 * after[0]["train_fvu"]  # ... while training keeps improving
    assert all(b["train_fvu"] < a["train_fvu"] * 1.05 for a, b in zip(after, after[1:]))


def test_memorising_run_fires_the_gap_warning_and_enough_rows_do_not(memorised, tmp_path):
    _, result = memorised
    x_train = ALL_ND[:64]
    report = evaluate_sae(load_sae(result.final_sae), [VAL_ND])
    gen = attach_generalisation(report, evaluate_sae(load_sae(result.final_sae), [x_train]))
    assert gen["warning"] and "more documents" in gen["warning"] and "smaller width" in gen["warning"]
    assert gen["heldout"]["fvu"] > 1.5 * gen["train"]["fvu"] and gen["gap"] > 0.05
    text = format_report(report)
    assert "Training vs held-out reconstruction" in text and "WARNING:" in text

    sae, batches, cfg = memorise_setup(4096)
    big = train(sae, batches, cfg, tmp_path / "big", val_batches=VAL_ND)
    rows = val_rows(tmp_path / "big")
    assert rows[-1]["val_fvu"] <= 1.05 * min(r["val_fvu"] for r in rows)  # no turn upwards
    report = evaluate_sae(big.sae, [VAL_ND])
    gen = attach_generalisation(report, evaluate_sae(big.sae, [ALL_ND[:4096]]))
    assert gen["warning"] is None and "WARNING" not in format_report(report)


def test_generalisation_gap_thresholds():
    assert generalisation_gap(0.1, 0.16)["warning"] is not None  # 1.6x and +0.06
    assert generalisation_gap(0.1, 0.14)["warning"] is None  # under 1.5x
    assert generalisation_gap(0.01, 0.05)["warning"] is None  # 5x but only +0.04
    assert generalisation_gap(0.01, 0.05, absolute=0.02)["warning"] is not None
    g = generalisation_gap(0.2, 0.3)
    assert g["gap"] == pytest.approx(0.1) and g["ratio"] == pytest.approx(1.5)


def test_metrics_summary_and_plot_record_validation_and_epochs(memorised):
    run_dir, result = memorised
    for r in val_rows(run_dir):
        assert {"val_fvu", "val_l0", "val_dead_fraction", "val_rows", "train_fvu", "epochs"} <= set(r)
        assert r["val_rows"] == 512 and 0 <= r["val_dead_fraction"] <= 1 and 0 < r["val_l0"] <= 4
        assert r["epochs"] == pytest.approx(r["step"] * 32 / 64)
    summary = read_json(run_dir / TRAIN_SUMMARY)
    assert summary["epochs"] == pytest.approx(300 * 32 / 64) == result.epochs
    assert summary["rows_per_epoch"] == 64 and summary["exported_step"] == 300 and not summary["selects_best"]
    assert summary["last_validation"]["val_fvu"] == val_rows(run_dir)[-1]["val_fvu"]
    assert (run_dir / VAL_CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_fvu_is_the_saved_sae_fvu_on_raw_rows(memorised):
    """The trainer measures in the normalised space; the exported SAE on raw rows gives the same FVU."""
    run_dir, result = memorised
    report = evaluate_sae(load_sae(result.final_sae), [VAL_ND])
    assert report["reconstruction"]["fvu"] == pytest.approx(val_rows(run_dir)[-1]["val_fvu"], rel=1e-4)
    assert report["sparsity"]["l0_mean"] == pytest.approx(val_rows(run_dir)[-1]["val_l0"], rel=1e-6)


def test_epoch_warning(tmp_path, caplog):
    sae, batches, cfg = memorise_setup(total_steps=60, eval_every=0)
    with caplog.at_level("WARNING"):
        train(sae, batches, cfg, tmp_path / "a")  # 60 * 32 / 64 = 30 passes > 20
    assert any("30.0 passes over its 64 training rows" in r.getMessage() for r in caplog.records)
    caplog.clear()
    sae, batches, cfg = memorise_setup(total_steps=60, eval_every=0, max_epochs_warning=40)
    with caplog.at_level("WARNING"):
        train(sae, batches, cfg, tmp_path / "b")
    assert not any("passes over" in r.getMessage() for r in caplog.records)


def test_validation_does_not_change_training(tmp_path):
    """Measuring the held-out sample touches no weight, buffer, RNG or data position."""
    a_sae, a_batches, cfg = make_setup(total_steps=30, eval_every=5)
    a = train(a_sae, a_batches, cfg, tmp_path / "a", val_batches=VAL_ND)
    b_sae, b_batches, cfg = make_setup(total_steps=30, eval_every=5)
    b = train(b_sae, b_batches, cfg, tmp_path / "b")
    assert len(val_rows(tmp_path / "a")) == 6 and not (tmp_path / "b" / METRICS).read_text().count("val_fvu")
    assert same_tensors(read_checkpoint(a.run_dir).sae_tensors, read_checkpoint(b.run_dir).sae_tensors)
    assert same_tensors(read_checkpoint(a.run_dir).optimizer_tensors, read_checkpoint(b.run_dir).optimizer_tensors)


def test_validation_set_from_tensor_source_and_batches():
    x = torch.arange(40 * 4, dtype=torch.float32).reshape(40, 4)
    assert ValidationSet.from_any(x, 10, 4).x_ND.shape == (10, 4)
    assert torch.equal(ValidationSet.from_any(x, 10, 4).x_ND[[0, -1]], x[[0, -1]])  # spread over all rows
    from_source = ValidationSet.from_any(TensorBatches(x, 8, shuffle=False), 20, 4).x_ND
    assert torch.equal(from_source, x[:20])
    assert torch.equal(ValidationSet.from_any([x[:7], (x[7:30],)], 12, 4).x_ND, x[:12])
    with pytest.raises(ConfigError, match="NaN"):
        ValidationSet.from_any(torch.full((4, 4), float("nan")), 10, 4)
    with pytest.raises(Exception, match="d_in=5"):
        ValidationSet.from_any(x, 10, 5)


# -- issue 26: best checkpoint and early stopping ---------------------------------------------------
def test_select_best_exports_the_best_validation_checkpoint(memorised, tmp_path):
    sae, batches, cfg = memorise_setup(select_best=True)
    result = train(sae, batches, cfg, tmp_path / "best", val_batches=VAL_ND)
    rows = val_rows(tmp_path / "best")
    best = min(rows, key=lambda r: r["val_fvu"])
    assert result.exported_step == best["step"] < 300 and result.state.best_step == best["step"]
    assert [r["step"] for r in rows] == [r["step"] for r in val_rows(memorised[0])]  # same run otherwise
    report = evaluate_sae(load_sae(result.final_sae), [VAL_ND])
    assert report["reconstruction"]["fvu"] == pytest.approx(best["val_fvu"], rel=1e-4)
    last = evaluate_sae(load_sae(memorised[1].final_sae), [VAL_ND])["reconstruction"]["fvu"]
    assert report["reconstruction"]["fvu"] < 0.95 * last
    assert read_json(tmp_path / "best" / TRAIN_SUMMARY)["exported_step"] == best["step"]


def test_early_stopping_and_its_resume_pick_the_same_checkpoint(tmp_path):
    over = dict(early_stop_patience=3, checkpoint_every=20)
    sae, batches, cfg = memorise_setup(**over)
    ref = train(sae, batches, cfg, tmp_path / "ref", val_batches=VAL_ND)
    best, stop = ref.state.best_step, ref.state.step
    assert ref.state.stopped_early and stop == best + 3 * 20 < 300
    assert ref.exported_step == best

    sae, batches, cfg = memorise_setup(**over)
    crash = best + 45  # after the best evaluation, with a checkpoint that holds it, before the stop
    with pytest.raises(RuntimeError, match="crash"):
        train(sae, batches, cfg, tmp_path / "cut", callbacks=[FailAt(crash)], val_batches=VAL_ND)
    assert read_checkpoint(tmp_path / "cut").state.best_step == best
    sae, batches, cfg = memorise_setup(**over)
    again = train(sae, batches, cfg, tmp_path / "cut", resume=True, val_batches=VAL_ND)
    assert (again.exported_step, again.state.step, again.state.stopped_early) == (best, stop, True)
    assert same_tensors(final_tensors(again.final_sae), final_tensors(ref.final_sae))

    sae, batches, cfg = memorise_setup(**over)  # a finished run resumed exports the same one again
    done = train(sae, batches, cfg, tmp_path / "ref", resume="auto", val_batches=VAL_ND)
    assert done.steps_run == 0 and same_tensors(final_tensors(done.final_sae), final_tensors(ref.final_sae))


def test_selection_refuses_a_different_validation_sample_on_resume(tmp_path):
    sae, batches, cfg = memorise_setup(total_steps=40, select_best=True, checkpoint_every=20)
    with pytest.raises(RuntimeError):
        train(sae, batches, cfg, tmp_path, callbacks=[FailAt(30)], val_batches=VAL_ND)
    sae, batches, cfg = memorise_setup(total_steps=40, select_best=True, checkpoint_every=20)
    with pytest.raises(ResumeMismatchError, match="validation sample"):
        train(sae, batches, cfg, tmp_path, resume=True, val_batches=VAL_ND[:100])
    sae, batches, cfg = memorise_setup(total_steps=40, select_best=True, checkpoint_every=20, eval_every=10)
    with pytest.raises(ResumeMismatchError, match="eval_every"):
        train(sae, batches, cfg, tmp_path, resume=True, val_batches=VAL_ND)


def test_selection_needs_validation(tmp_path):
    with pytest.raises(ConfigError, match="eval_every"):
        TrainConfig(total_steps=10, select_best=True, eval_every=0)
    sae, batches, cfg = memorise_setup(select_best=True)
    with pytest.raises(ConfigError, match="val_batches"):
        train(sae, batches, cfg, tmp_path)


# -- issue 24, item 3: the SAE object passed to train() means what the saved one means --------------
def test_trained_sae_object_encodes_raw_rows_like_the_saved_final_sae(tmp_path):
    sae, batches, cfg = make_setup(arch="topk")
    result = train(sae, batches, cfg, tmp_path)
    assert result.sae is sae and abs(result.state.input_scale - 1.0) > 0.1  # a real normalisation
    assert getattr(sae, "input_scale", None) is None and not sae.training
    saved = load_sae(result.final_sae)
    raw_ND = ALL_ND[-256:]
    mine, theirs = sae.encode(raw_ND), saved.encode(raw_ND)
    assert torch.equal(mine.indices, theirs.indices) and torch.equal(mine.values, theirs.values)
    assert torch.equal(sae(raw_ND).recon, saved(raw_ND).recon)
    fvu = evaluate_sae(sae, [raw_ND])["reconstruction"]["fvu"]
    assert fvu == evaluate_sae(saved, [raw_ND])["reconstruction"]["fvu"] and fvu < 0.5


def test_interrupted_sae_is_folded_and_resuming_the_same_object_unfolds_it(tmp_path):
    ref_sae, batches, cfg = make_setup(arch="topk")
    ref = train(ref_sae, batches, cfg, tmp_path / "ref")
    sae, batches, cfg = make_setup(arch="topk")
    with pytest.raises(RuntimeError, match="crash"):
        train(sae, batches, cfg, tmp_path / "cut", callbacks=[FailAt(25)])
    assert getattr(sae, "input_scale", None) is None  # no half-state: it works on raw rows
    raw_ND = ALL_ND[-256:]
    assert evaluate_sae(sae, [raw_ND])["reconstruction"]["fvu"] < 1.0
    _, batches, cfg = make_setup(arch="topk")
    again = train(sae, batches, cfg, tmp_path / "cut", resume=True)  # the same object, folded, resumed
    assert again.start_step == 20
    assert same_tensors(final_tensors(again.final_sae), final_tensors(ref.final_sae))
    assert torch.equal(sae(raw_ND).recon, ref_sae(raw_ND).recon)


# -- the run layer: the run's held-out documents by default, the report's side-by-side ----------------
def test_run_layer_validates_on_the_eval_split_and_reports_the_gap(tmp_path, one_thread, monkeypatch):
    from support.runs import synthetic_docs, tiny_lm

    from saekit.run.config import RunConfig
    from saekit.run.stages import cache_stage, eval_stage, run_store, train_stage, validation_rows

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in synthetic_docs(60, seed=2, min_words=6)))
    cfg = RunConfig.from_dict({
        "name": "v", "output_dir": str(tmp_path / "run"), "corpus": {"name": str(corpus), "min_chars": 1},
        "source": {"kind": "hf", "model": str(tiny_lm(tmp_path / "tiny_lm")), "hooks": ["transformer.h.1"],
                   "max_length": 16, "batch_size": 16},
        "sae": {"architecture": "topk", "d_sae": 24, "k": 3},
        "train": {"total_steps": 12, "batch_size": 32, "log_every": 5, "eval_every": 4, "checkpoint_every": 0,
                  "progress_bar": False, "normalize_activations": "expected_average_only_in"},
        "eval": {"holdout": 0.2, "description_length": False, "splice_docs": 0}})
    cache_stage(cfg)
    train_stage(cfg)
    folder = cfg.folder
    rows = val_rows(folder.train())
    assert [r["step"] for r in rows] == [4, 8, 12] and all(r["val_rows"] > 1 for r in rows)
    assert folder.val_curve().exists() and read_json(folder.train_summary())["epochs"] > 0

    store = run_store(cfg)
    train_ids, held_ids = store.split_by_document(cfg.eval.holdout, seed=cfg.seed)
    sample = validation_rows(store, held_ids, 10_000)
    assert torch.equal(sample, store[held_ids]) and rows[0]["val_rows"] == len(held_ids)  # the eval stage's rows

    report = eval_stage(cfg)
    gen = report["generalisation"]
    assert gen["heldout"]["fvu"] == report["reconstruction"]["fvu"]
    assert gen["train"]["rows"] == len(train_ids) and gen["training"]["epochs"] == pytest.approx(rows[-1]["epochs"])
    assert rows[-1]["val_fvu"] == pytest.approx(report["reconstruction"]["fvu"], rel=1e-4)  # validation == eval
    assert "Training vs held-out reconstruction" in (folder.eval / "report.txt").read_text()

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "dashboards"))
    pytest.importorskip("streamlit")
    from views.reports import training_curve

    assert training_curve(folder)["val_fvu"].notna().sum() == 3
