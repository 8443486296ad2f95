"""Massive-activation outliers (issue 22): a store with a handful of rows planted ×100 flags exactly
them, training without them is training on the clean rows, the evaluation's headline is the clean
rows' and the outliers are reported apart, splice-in passes them through, the browser marks them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from saekit.artifacts import load_tensors, read_json, save_tensors, sha256_file
from saekit.errors import ConfigError, CorruptArtifactError
from saekit.eval.reconstruction import ReconstructionAccumulator
from saekit.eval.report import evaluate_sae
from saekit.eval.report_text import compare_table, format_report
from saekit.layout import RunFolder
from saekit.run.config import RunConfig
from saekit.run.stages import create_sae_for, eval_stage, save_resolved, train_run
from saekit.sae.registry import load_sae, save_sae
from saekit.store.manifest import MANIFEST
from saekit.store.outliers import OutlierRule, row_norms
from saekit.store.reader import ActivationStore
from saekit.train.loop import train
from saekit.store.batches import TensorBatches
from support.planted import is_planted, planted_store

EVERY = 4  # position 1 of every 4th document is planted ×100 (about 3 % of the rows)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("planted") / "store", every=EVERY)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("clean") / "store", every=0)


def planted_mask(store: ActivationStore) -> torch.Tensor:
    return is_planted(store.meta("doc_id"), store.meta("pos").long(), EVERY)


def run_config(tmp_path, store, exclude: bool | None = None, **eval_kw) -> RunConfig:
    train = {"total_steps": 12, "batch_size": 32, "normalize_activations": "expected_average_only_in",
             "norm_batches": 3, "progress_bar": False, "checkpoint_every": 0, "lr": 1e-3}
    if exclude is not None:
        train["exclude_outliers"] = exclude
    return RunConfig.from_dict({
        "name": "t", "output_dir": str(tmp_path / "run"), "seed": 3, "store": {"path": str(store)},
        "source": {"kind": "hf", "model": "m", "hooks": ["h"]},
        "sae": {"architecture": "topk", "d_sae": 24, "k": 3},
        "train": train, "eval": {"holdout": 0.2, "splice_docs": 0, "description_length": False, **eval_kw}})


# -- the store ---------------------------------------------------------------------------------
def test_planted_rows_are_flagged_and_the_manifest_records_the_rule_and_statistics(planted):
    store = ActivationStore(planted)
    expected = planted_mask(store)
    assert expected.sum() >= 10
    assert torch.equal(store.outlier_mask(), expected)
    assert torch.equal(store.gather("outlier", np.arange(len(store))), expected)
    m = store.manifest
    assert m.outlier_rule["multiple"] == 4.0 and "median" in m.outlier_rule["description"]
    stats = m.norm_stats
    assert stats["outliers"] == int(expected.sum()) == stats["buckets"]["pos 1"]["outliers"]
    assert stats["buckets"]["pos 0"]["outliers"] == 0
    assert stats["outlier_sq_norm_share"] > 0.9  # ×100 rows hold nearly all of the squared norm
    assert set(stats["buckets"]["pos 1"]["quantiles"]) >= {"p50", "p99"}
    assert sum(b["rows"] for b in stats["buckets"].values()) == len(store)


def test_outlier_column_is_in_every_shard_and_covered_by_its_sha256(planted):
    store = ActivationStore(planted)
    for entry in store.manifest.shards:
        with safe_open(str(store.path / entry["file"]), "pt") as f:
            assert {"norm", "outlier"} <= set(f.keys())
        assert sha256_file(store.path / entry["file"]) == entry["sha256"]
    assert store.has_outlier_column


def test_flipping_an_outlier_flag_is_detected(planted, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(planted, copy)
    store = ActivationStore(copy)
    f = store.path / store.manifest.shards[0]["file"]
    cols = load_tensors(f)
    cols["outlier"] = 1 - cols["outlier"]
    save_tensors(f, cols)
    with pytest.raises(CorruptArtifactError, match="sha256"):
        ActivationStore(copy).outlier_mask()


def _strip_to_old_format(folder) -> None:
    """What a store cached before outliers existed looks like: no norm/outlier columns, no manifest fields."""
    m = read_json(folder / MANIFEST)
    for entry in m["shards"]:
        cols = load_tensors(folder / entry["file"])
        entry["sha256"] = save_tensors(folder / entry["file"], {k: v for k, v in cols.items()
                                                              if k not in ("norm", "outlier")})
    m.pop("outlier_rule"), m.pop("norm_stats")
    (folder / MANIFEST).write_text(json.dumps(m))


def test_store_cached_before_the_column_derives_the_same_mask(planted, tmp_path):
    import shutil

    new = ActivationStore(planted)
    shutil.copytree(planted, tmp_path / "old")
    _strip_to_old_format(tmp_path / "old" / new.path.name)
    old = ActivationStore(tmp_path / "old")
    assert not old.has_outlier_column and old.manifest.norm_stats is None
    assert torch.equal(old.outlier_mask(), new.outlier_mask())
    assert torch.equal(old.meta("norm"), new.meta("norm"))
    assert old.norm_stats == new.manifest.norm_stats


def test_row_norms_do_not_depend_on_batching():
    x = torch.randn(300, 64) * 50
    assert torch.equal(row_norms(x), torch.cat([row_norms(x[:7]), row_norms(x[7:])]))
    assert torch.equal(OutlierRule(4.0).flag(torch.tensor([1.0, 1.0, 1.0, 4.0, 4.01])),
                       torch.tensor([False, False, False, False, True]))


def test_embedding_store_gets_one_bucket(tmp_path):
    from saekit.sources.base import ActivationBatch
    from saekit.store.writer import StoreConfig, cache_activations

    class Emb:
        hooks = ["embedding"]

        def spec(self):
            return {"kind": "embedding", "model": "e", "hooks": ["embedding"], "d_in": {"embedding": 8}}

        def iter_batches(self, docs):
            g = torch.Generator().manual_seed(docs[0]["doc_id"])
            x = torch.nn.functional.normalize(torch.randn(len(docs), 8, generator=g), dim=-1)
            x[0] *= 50  # one planted outlier per shard
            n = len(docs)
            yield ActivationBatch({"embedding": x}, torch.tensor([d["doc_id"] for d in docs]),
                                  torch.full((n,), -1, dtype=torch.int32), torch.full((n,), -1, dtype=torch.int32))

    docs = [{"doc_id": i, "text": f"doc {i}", "labels": {}} for i in range(40)]
    cache_activations(Emb(), docs, tmp_path / "s", StoreConfig(docs_per_shard=20, sort_by_length=False))
    store = ActivationStore(tmp_path / "s")
    stats = store.manifest.norm_stats
    assert list(stats["buckets"]) == ["all"] and stats["outliers"] == 2
    assert store.outlier_mask().nonzero().flatten().tolist() == [0, 20]


# -- the run config ------------------------------------------------------------------------------
def test_exclude_outliers_is_a_run_key_of_the_train_section(tmp_path, planted):
    cfg = run_config(tmp_path, planted)
    assert cfg.exclude_outliers is True and "exclude_outliers" not in cfg.train_config().to_dict()
    assert run_config(tmp_path, planted, exclude=False).exclude_outliers is False
    with pytest.raises(ConfigError, match="exclude_outliers"):
        run_config(tmp_path, planted, exclude="yes")
    save_resolved(cfg)
    import yaml

    assert yaml.safe_load(cfg.folder.config.read_text())["train"]["exclude_outliers"] is True


# -- training --------------------------------------------------------------------------------------
def _weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.sae.state_dict().items()}


def test_training_without_outliers_equals_training_on_the_clean_rows(tmp_path, planted, one_thread):
    cfg = run_config(tmp_path, planted)
    result = train_run(cfg, resume=False)
    store = ActivationStore(planted)
    train_rows, _ = store.split_by_document(cfg.eval.holdout, seed=cfg.seed)
    clean_rows = train_rows[~planted_mask(store)[train_rows]]
    sae = create_sae_for(cfg.sae, store.d_in, store.hook, store.manifest["source"], cfg.seed, cfg.corpus.name)
    tcfg = cfg.train_config()
    reference = train(sae, TensorBatches(store[clean_rows], tcfg.batch_size, seed=cfg.seed), tcfg, tmp_path / "ref")
    assert result.state.input_scale == reference.state.input_scale  # the normalisation is the clean rows'
    for k, v in _weights(reference).items():
        assert torch.equal(result.sae.state_dict()[k], v), k
    data = read_json(cfg.folder.train_data())
    n_flagged = int(planted_mask(store)[train_rows].sum())
    assert n_flagged > 0 and data["excluded_outliers"] == n_flagged
    assert data["rows_used"] == len(clean_rows) and data["exclude_outliers"] is True


def test_a_store_without_outliers_is_unchanged_by_the_option(tmp_path, clean, one_thread):
    on = train_run(run_config(tmp_path / "on", clean, exclude=True), resume=False)
    off = train_run(run_config(tmp_path / "off", clean, exclude=False), resume=False)
    assert ActivationStore(clean).outlier_mask().sum() == 0
    for k, v in _weights(on).items():
        assert torch.equal(off.sae.state_dict()[k], v), k
    assert read_json(RunFolder(tmp_path / "on" / "run").train_data())["excluded_outliers"] == 0


def test_option_off_trains_on_the_outliers_too(tmp_path, planted, one_thread):
    cfg = run_config(tmp_path, planted, exclude=False)
    off = train_run(cfg, resume=False)
    on = train_run(run_config(tmp_path / "on", planted), resume=False)
    assert off.state.input_scale != on.state.input_scale
    data = read_json(cfg.folder.train_data())
    assert data["excluded_outliers"] == 0 and data["outliers_in_training_docs"] > 0


# -- evaluation ------------------------------------------------------------------------------------
@pytest.fixture
def evaluated(tmp_path, planted):
    cfg = run_config(tmp_path, planted)
    store = ActivationStore(planted)
    sae = create_sae_for(cfg.sae, store.d_in, store.hook, store.manifest["source"], 0)
    save_sae(sae, cfg.folder.final_sae())
    return cfg, store, load_sae(cfg.folder.train()), eval_stage(cfg)


def test_headline_fvu_is_the_clean_rows_fvu_and_outliers_are_reported_apart(evaluated):
    cfg, store, sae, report = evaluated
    _, held = store.split_by_document(cfg.eval.holdout, seed=cfg.seed)
    flagged = planted_mask(store)[held]
    clean_report = evaluate_sae(sae, [store[held[~flagged]]])
    assert report["reconstruction"]["fvu"] == pytest.approx(clean_report["reconstruction"]["fvu"], rel=1e-12)
    assert report["n_rows"] == int((~flagged).sum())
    acc = ReconstructionAccumulator(sae.cfg.d_in, sae.cfg.d_sae)
    with torch.no_grad():
        x = store[held[flagged]]
        out = sae(x)
        acc.update(x, out.recon, out.code)
    section = report["outliers"]
    assert flagged.sum() >= 2 and section["count"] == int(flagged.sum())
    assert section["fvu"] == pytest.approx(acc.result()["fvu"], rel=1e-9)
    assert section["rule"]["multiple"] == 4.0
    everything = evaluate_sae(sae, [store[held]])
    assert section["all_rows"]["fvu"] == pytest.approx(everything["reconstruction"]["fvu"], rel=1e-9)
    assert report["row_set"]["outlier_rows"] == section["count"]
    text = format_report(report)
    assert "outlier rows" in text and "4 x the shard median row norm" in text


def test_report_is_strict_json_without_outliers(tmp_path, clean):
    cfg = run_config(tmp_path, clean)
    store = ActivationStore(clean)
    save_sae(create_sae_for(cfg.sae, store.d_in, store.hook, store.manifest["source"], 0), cfg.folder.final_sae())
    report = eval_stage(cfg)
    assert report["outliers"]["count"] == 0 and report["outliers"]["fvu"] is None
    json.loads((cfg.folder.eval / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_compare_flags_reports_on_different_row_sets(evaluated):
    report = evaluated[3]
    old = {k: v for k, v in report.items() if k not in ("row_set", "outliers")}
    assert "WARNING" not in compare_table({"a": report, "b": report})
    table = compare_table({"new": report, "old": old})
    assert "WARNING" in table and "different row sets" in table and "old: all rows" in table


# -- splice-in ------------------------------------------------------------------------------------
def test_splice_passes_outlier_positions_through(tmp_path):
    from saekit.eval.splice import splice_lm_loss
    from saekit.sources.hooks import capture
    from saekit.sources.models import load_lm
    from support.runs import synthetic_docs, tiny_lm

    model, tok = load_lm(str(tiny_lm(tmp_path / "lm")))
    texts = [d["text"] for d in synthetic_docs(6)]
    enc = tok(texts[:1], return_tensors="pt")
    acts = capture(model, ["transformer.h.0"], lambda: model(**enc))["transformer.h.0"]
    threshold = float(acts.norm(dim=-1).median())  # about half the positions count as "outliers"

    def breaks_outliers(a):  # the identity on ordinary positions, wrong on outliers
        return torch.where(a.norm(dim=-1, keepdim=True) > threshold, torch.zeros_like(a), a)

    kw = {"reconstruct": breaks_outliers, "max_length": 16, "batch_size": 3}
    passed = splice_lm_loss(model, tok, "transformer.h.0", texts=texts, passthrough_norm=threshold, **kw)
    assert passed["ce_spliced"] == pytest.approx(passed["ce_clean"], abs=1e-6)
    assert passed["passthrough"]["outlier_positions"] > 0
    assert passed["passthrough"]["norm_threshold"] == threshold
    plain = splice_lm_loss(model, tok, "transformer.h.0", texts=texts, **kw)
    assert abs(plain["ce_spliced"] - plain["ce_clean"]) > 1e-3 and plain["passthrough"]["outlier_positions"] == 0
    identity = splice_lm_loss(model, tok, "transformer.h.0", texts=texts, reconstruct=lambda a: a,
                              passthrough_norm=threshold, max_length=16, batch_size=3)
    assert identity["ce_spliced"] == pytest.approx(identity["ce_clean"], abs=1e-6)
    assert identity["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert not math.isclose(identity["ce_zero_ablation"], identity["ce_clean"])


# -- the browser bundle ------------------------------------------------------------------------------
def test_bundle_marks_the_feature_whose_top_examples_are_outliers(tmp_path):
    from saekit.analysis.features import AnalyzeConfig
    from saekit.browser.build import build_bundle
    from saekit.browser.bundle import Bundle
    from support.planted import planted_run

    run, f = planted_run(tmp_path / "run")
    b = Bundle(build_bundle(run, AnalyzeConfig(top_examples=6, context=2, logit_lens=False)))
    rec = b.feature(f)
    assert rec["mostly_outliers"] and rec["outlier_examples"] == len(rec["top"]) == 6
    assert all(x["outlier"] for x in rec["top"])
    assert not b.feature(0)["mostly_outliers"]  # dead: no top examples
    table = b.table.set_index("feature")
    assert bool(table.loc[f, "mostly_outliers"]) and int(table["mostly_outliers"].sum()) == rec_count(b)
    facts = b.manifest["outliers"]
    assert facts["excluded_in_training"] is True and facts["rule"]["multiple"] == 4.0
    assert facts["store_outliers"] == int(ActivationStore(RunFolder(run).store).outlier_mask().sum())
    assert facts["threshold_norm"] == pytest.approx(4 * facts["median_norm"], rel=1e-6)


def rec_count(b) -> int:
    return sum(bool(b.feature(g).get("mostly_outliers")) for g in range(b.d_sae))


# -- what the main job prints ----------------------------------------------------------------------
def test_cli_says_how_many_rows_training_excluded(tmp_path, planted, one_thread, capsys):
    import yaml

    from saekit.cli import main
    from saekit.cli.run import _print_run
    from saekit.run.outliers import read_training_rows

    cfg = run_config(tmp_path, planted)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", str(path)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = line["training_rows"]["excluded_outliers"]
    assert n > 0 and line["training_rows"]["exclude_outliers"] is True
    report = eval_stage(cfg)
    _print_run(cfg, {"report": report, "final_sae": str(cfg.folder.final_sae()),
                     "training_rows": read_training_rows(cfg.folder.train_data())})
    out = capsys.readouterr().out
    assert f"excluded {n} massive-activation outlier rows" in out
    assert f"{report['outliers']['count']} massive-activation outlier rows" in out and "Headline figures are on" in out
