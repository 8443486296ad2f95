"""Every sub-command answers the mistakes people make with a named error, never a traceback (issue 25).

Why a table: each new command brings its own gaps (a dependency's FileNotFoundError, a store "corrupt"
when it was never cached). The sub-commands are enumerated from the CLI's own registration
(`saekit.cli.build_parser`), so a sub-command added without rows here fails `test_every_sub_command_has_rows`.

Each row runs `saekit.cli.main(argv)` in-process in a workspace holding a tiny run, a store, an SAE
folder without weights and configs, and asserts: exit code 2; the last stderr line names the error
class, what was expected and what was found (and the command that fixes it, where there is one); no
traceback; nothing written outside the folder the row allows (the run folder it names); nothing that
existed deleted or overwritten. A few rows also run as real subprocesses (`python -m saekit`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from saekit.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]

GOOD_RUN = {  # a valid tiny run config (local corpus, tiny local GPT-2); rows change one thing
    "name": "fresh",
    "output_dir": "fresh",
    "corpus": {"name": "data/docs.jsonl", "label_fields": ["sentiment"], "min_chars": 1},
    "source": {"kind": "hf", "model": "tiny_lm", "hooks": ["transformer.h.1"], "batch_size": 16},
    "store": {"docs_per_shard": 64},
    "sae": {"architecture": "topk", "d_sae": 64, "k": 4},
    "train": {"total_steps": 2, "batch_size": 32, "log_every": 1, "checkpoint_every": 0},
}


def _with(**changes) -> dict:
    """GOOD_RUN with top-level sections replaced or merged (a dict merges into the section)."""
    out = json.loads(json.dumps(GOOD_RUN))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


CONFIG_FILES = {  # name -> YAML text
    "good.yaml": yaml.safe_dump(GOOD_RUN),
    "empty.yaml": "",
    "malformed.yaml": "name: [unclosed\n  corpus: {",
    "list.yaml": "- name: a\n- name: b\n",
    "unknown_key.yaml": yaml.safe_dump(_with(trian={"total_steps": 2})),
    "wrong_type.yaml": yaml.safe_dump(_with(seed="zero")),
    "section_not_mapping.yaml": yaml.safe_dump(_with(corpus="data/docs.jsonl")),
    "out_of_range.yaml": yaml.safe_dump(_with(corpus={"max_docs": -5})),
    "corpus_typo.yaml": yaml.safe_dump(_with(corpus={"name": "data/mytweets.jsonl"})),
    "model_offline.yaml": yaml.safe_dump(_with(source={"model": "no-such-org/no-such-model-xyz"})),
    "bad_hook.yaml": yaml.safe_dump(_with(source={"hooks": ["transformer.h.9"]})),
    "bad_train.yaml": yaml.safe_dump(_with(train={"batch_size": 0})),
    "store_clash.yaml": yaml.safe_dump(_with(store={"path": "run/store"})),
    "resume.yaml": yaml.safe_dump(_with(store={"path": "run/store"}, sae={"d_sae": 64})),
    "multi.yaml": yaml.safe_dump({**{k: v for k, v in GOOD_RUN.items() if k not in ("sae", "train")},
                                  "saes": [{"name": "a", "sae": {"architecture": "topk", "d_sae": 64, "k": 4}}]}),
    "mdl_unknown_key.yaml": yaml.safe_dump({"output_dir": "mdl", "data": {"synthetic": {}}, "gird": {}}),
    "mdl_missing_key.yaml": yaml.safe_dump({"data": {"synthetic": {}}}),
}


# -- the workspace ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with a tiny run (store + SAE), a run without an SAE, an SAE folder without weights, an
    SAE of another width, a run whose model is gone, runs with an unreadable or empty eval report, a
    corpus file and the configs."""
    from saekit.sae.registry import save_sae
    from tests.support.runs import make_sae, synthetic_docs, tiny_run

    ws = tmp_path_factory.mktemp("ws")
    tiny_run(ws / "run", n_docs=60, model_dir=ws / "tiny_lm")
    (ws / "data").mkdir()
    docs = [{"text": d["text"], "sentiment": d["labels"]["sentiment"]} for d in synthetic_docs(40)]
    (ws / "data" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    shutil.copytree(ws / "run" / "store", ws / "run_no_sae" / "store")
    shutil.copytree(ws / "run" / "train" / "final_sae", ws / "sae_no_weights")
    (ws / "sae_no_weights" / "sae_weights.safetensors").unlink()
    shutil.copytree(ws / "run", ws / "run_bad_report")
    (ws / "run_bad_report" / "eval").mkdir()
    (ws / "run_bad_report" / "eval" / "report.json").write_text('{"fvu": ')
    _run_without_model(ws)
    shutil.copytree(ws / "run", ws / "run_empty_report")
    (ws / "run_empty_report" / "eval").mkdir()
    (ws / "run_empty_report" / "eval" / "report.json").write_text("")
    save_sae(make_sae(8, 16, 2), ws / "sae_d8")
    (ws / "empty_dir").mkdir()
    for name, text in CONFIG_FILES.items():
        (ws / name).write_text(text)
    return ws


def _run_without_model(ws: Path) -> None:
    """A copy of the tiny run whose store names a model folder that is not there (moved or deleted)."""
    shutil.copytree(ws / "run", ws / "run_model_gone")
    manifest = ws / "run_model_gone" / "store" / "transformer.h.1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["source"]["model"] = str(ws / "moved_lm")
    manifest.write_text(json.dumps(data))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root -> (inode, size, mtime): a rewrite, an atomic replace or a delete shows."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


# -- running the CLI -------------------------------------------------------------------------------
def run_in_process(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `saekit.cli.main(argv)`; an exception other than SystemExit is a bug and
    comes back as exit 1 with its traceback, as it would from the console script."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 — the sweep reports it as the bug it is
            traceback.print_exc(file=err)
            code = 1
    return code, err.getvalue()


def run_subprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "saekit", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    return p.returncode, p.stderr


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One mistake with one sub-command. `says`: substrings of the last stderr line (what was expected,
    what was found); `fix`: the command it names; `may_write`: the run folder it may add files to."""

    command: str
    mistake: str
    args: tuple[str, ...]
    error: str
    says: tuple[str, ...] = ()
    fix: str = ""
    may_write: str = ""
    subprocess: bool = False

    @property
    def id(self) -> str:
        return f"{self.command}:{self.mistake}"


def _config_rows(command: str, subprocess_rows: tuple[str, ...] = ()) -> list[Row]:
    """The config mistakes, for every sub-command that reads a run config."""
    rows = [
        ("missing path", "nope.yaml", "ConfigError", ("expected a run config", "nope.yaml"), ""),
        ("a folder that is not a run", "empty_dir", "ConfigError", ("expected a run config", "empty_dir"), ""),
        ("a store where a run config is expected", "run/store", "ConfigError", ("expected a run config",), ""),
        ("empty file", "empty.yaml", "ConfigError", ("expected a run config", "empty"), ""),
        ("malformed YAML", "malformed.yaml", "ConfigError", ("not valid YAML",), ""),
        ("not a mapping", "list.yaml", "ConfigError", ("expected a mapping", "list"), ""),
        ("unknown key", "unknown_key.yaml", "ConfigError", ("unknown key 'trian'", "did you mean 'train'"), ""),
        ("wrong type", "wrong_type.yaml", "ConfigError", ("seed", "zero"), ""),
        ("section not a mapping", "section_not_mapping.yaml", "ConfigError", ("corpus", "expected a mapping", "str"), ""),
        ("out-of-range number", "out_of_range.yaml", "ConfigError", ("max_docs", "-5"), ""),
    ]
    if command in ("cache", "run"):
        rows += [
            ("corpus path typo", "corpus_typo.yaml", "ConfigError",
             ("data/mytweets.jsonl", "no such file", "not a hub dataset"), ""),
            ("model not available offline", "model_offline.yaml", "ModelNotAvailableError",
             ("no-such-org/no-such-model-xyz",), ""),
            ("hook that does not exist", "bad_hook.yaml", "HookNotFoundError", ("transformer.h.9",), ""),
        ]
    if command in ("cache", "run"):
        rows += [("store path of another corpus's store", "store_clash.yaml", "StoreExistsError", ("run/store",), "")]
    if command in ("train", "run"):
        rows += [("bad train section", "bad_train.yaml", "ConfigError", ("batch_size", "0"), "")]
    if command == "run":
        rows += [("multi-SAE config", "multi.yaml", "ConfigError", ("multi-SAE config",), "saekit train multi.yaml")]
    return [Row(command, m, (command, arg), err, says, fix, may_write="fresh", subprocess=m in subprocess_rows)
            for m, arg, err, says, fix in rows]


ROWS: list[Row] = [
    *_config_rows("cache", subprocess_rows=("corpus path typo",)),
    *_config_rows("run"),
    *_config_rows("train"),
    Row("train", "train before cache", ("train", "good.yaml"), "StoreMissingError",
        ("expected an activation store", "fresh/store"), fix="saekit cache good.yaml", may_write="fresh",
        subprocess=True),
    Row("train", "resume without a checkpoint", ("train", "resume.yaml", "--resume", "yes"), "MissingCheckpointError",
        ("resume", "checkpoint"), may_write="fresh"),
    Row("train", "resume flag not a choice", ("train", "good.yaml", "--resume", "maybe"), "UsageError",
        ("--resume", "maybe")),
    # eval: a run folder, a run config, or an SAE folder with --store
    Row("eval", "missing path", ("eval", "nope"), "ConfigError", ("expected a run folder", "nope", "no such")),
    Row("eval", "a store where a run is expected", ("eval", "run/store"), "ConfigError",
        ("expected a run folder", "run/store")),
    Row("eval", "a run without an SAE", ("eval", "run_no_sae", "--store", "run_no_sae/store"), "MissingArtifactError",
        ("expected an SAE folder", "run_no_sae"), fix="saekit train"),
    Row("eval", "SAE folder without weights", ("eval", "sae_no_weights", "--store", "run/store"),
        "CorruptArtifactError", ("sae_weights.safetensors", "missing")),
    Row("eval", "SAE of another width than the store", ("eval", "sae_d8", "--store", "run/store"),
        "DInMismatchError", ("d_in=8", "d_in=32")),
    Row("eval", "store that does not exist", ("eval", "run/train", "--store", "nostore"), "StoreMissingError",
        ("expected an activation store", "nostore"), fix="saekit cache"),
    Row("eval", "config before cache", ("eval", "good.yaml"), "StoreMissingError",
        ("expected an activation store", "fresh/store"), fix="saekit cache good.yaml"),
    Row("eval", "config that does not exist", ("eval", "nope.yaml"), "ConfigError", ("expected a run config",)),
    Row("eval", "negative max rows", ("eval", "run/train", "--store", "run/store", "--max-rows", "-3"),
        "ConfigError", ("--max-rows", ">= 0", "-3")),
    Row("eval", "max rows not a number", ("eval", "run", "--max-rows", "many"), "UsageError", ("--max-rows", "many")),
    # compare
    Row("compare", "missing path", ("compare", "nope"), "MissingArtifactError", ("eval/report.json", "nope"),
        fix="saekit eval nope"),
    Row("compare", "a run without an eval report", ("compare", "run"), "MissingArtifactError",
        ("eval/report.json", "run"), fix="saekit eval run"),
    Row("compare", "empty report file", ("compare", "run_empty_report"), "CorruptArtifactError",
        ("report.json", "not valid JSON")),
    Row("compare", "malformed report JSON", ("compare", "run_bad_report"), "CorruptArtifactError",
        ("report.json", "not valid JSON")),
    # quickstart: reads configs/ relative to where it runs
    Row("quickstart", "run outside a checkout", ("quickstart",), "ConfigError",
        ("expected a run config", "configs/quickstart.yaml")),
    Row("quickstart", "unexpected argument", ("quickstart", "configs/quickstart.yaml"), "UsageError",
        ("unrecognized arguments",)),
    # analyze
    Row("analyze", "missing path", ("analyze", "nope"), "ConfigError", ("expected a run folder", "nope")),
    Row("analyze", "a store where a run is expected", ("analyze", "run/store"), "ConfigError",
        ("expected a run folder", "run/store")),
    Row("analyze", "a run without an SAE", ("analyze", "run_no_sae"), "MissingArtifactError",
        ("expected an SAE folder", "run_no_sae"), fix="saekit train"),
    Row("analyze", "SAE that does not exist", ("analyze", "run", "--sae", "wide"), "ConfigError",
        ("expected one of the run's SAEs", "'wide'")),
    Row("analyze", "out-of-range chunk rows", ("analyze", "run", "--chunk-rows", "0"), "ConfigError",
        ("chunk_rows", "0")),
    # explain
    Row("explain", "missing path", ("explain", "nope"), "ConfigError", ("expected a run folder", "nope")),
    Row("explain", "a run without a bundle", ("explain", "run"), "MissingArtifactError",
        ("expected a feature-browser bundle", "run"), fix="saekit analyze run"),
    Row("explain", "SAE that does not exist", ("explain", "run", "--sae", "wide"), "ConfigError",
        ("expected one of the run's SAEs", "'wide'")),
    Row("explain", "malformed feature list", ("explain", "run", "--features", "1-x"), "ConfigError",
        ("--features", "1-x")),
    # browse (--print-command: the sweep never starts a server)
    Row("browse", "missing path", ("browse", "nope", "--print-command"), "ConfigError",
        ("expected a run folder", "nope")),
    Row("browse", "a store where a run is expected", ("browse", "run/store", "--print-command"), "ConfigError",
        ("expected a run folder", "activation store")),
    Row("browse", "a run without a bundle", ("browse", "run", "--print-command"), "MissingArtifactError",
        ("expected a feature-browser bundle", "run"), fix="saekit analyze run"),
    Row("browse", "port not a number", ("browse", "run", "--port", "http"), "UsageError", ("--port", "http")),
    # probe
    Row("probe", "missing path", ("probe", "nope"), "ConfigError", ("expected a run folder", "nope")),
    Row("probe", "a store where a run is expected", ("probe", "run/store"), "ConfigError",
        ("expected a run folder", "run/store")),
    Row("probe", "a run without an SAE", ("probe", "run_no_sae"), "MissingArtifactError",
        ("expected an SAE folder", "run_no_sae"), fix="saekit train"),
    Row("probe", "label that does not exist", ("probe", "run", "--label", "mood"), "ConfigError",
        ("mood", "sentiment")),
    Row("probe", "positive class that does not exist", ("probe", "run", "--positive", "ecstatic"), "ConfigError",
        ("ecstatic", "not among the labels")),
    Row("probe", "SAE that does not exist", ("probe", "run", "--sae", "wide"), "ConfigError",
        ("expected one of the run's SAEs", "'wide'")),
    Row("probe", "negative max rows", ("probe", "run", "--max-rows", "-5"), "ConfigError", ("max_rows", "-5")),
    Row("probe", "ks not integers", ("probe", "run", "--ks", "one,two"), "ConfigError", ("integers", "one,two")),
    Row("probe", "out-of-range test fraction", ("probe", "run", "--test-frac", "1.5"), "ConfigError",
        ("test_frac", "1.5")),
    Row("probe", "unknown method", ("probe", "run", "--methods", "magic"), "ConfigError", ("magic",)),
    # steer
    Row("steer", "missing path", ("steer", "nope", "--prompt", "the cat", "--ablate", "1"), "ConfigError",
        ("expected a run folder", "nope")),
    Row("steer", "a run without an SAE", ("steer", "run_no_sae", "--prompt", "the cat", "--ablate", "1"),
        "MissingArtifactError", ("expected an SAE folder", "run_no_sae"), fix="saekit train"),
    Row("steer", "no edit", ("steer", "run", "--prompt", "the cat"), "ConfigError", ("at least one",)),
    Row("steer", "feature out of range", ("steer", "run", "--prompt", "the cat", "--feature", "4800", "--alpha", "2"),
        "ConfigError", ("d_sae=48", "4800")),
    Row("steer", "alphas do not match features",
        ("steer", "run", "--prompt", "the cat", "--feature", "1", "--feature", "2", "--alpha", "1", "--alpha", "2",
         "--alpha", "3"), "ConfigError", ("one --alpha per --feature", "3 alphas")),
    Row("steer", "clamp not N=V", ("steer", "run", "--prompt", "the cat", "--clamp", "3"), "ConfigError",
        ("N=V", "'3'")),
    Row("steer", "hook other than the SAE's",
        ("steer", "run", "--prompt", "the cat", "--ablate", "1", "--hook", "transformer.h.9"), "HookMismatchError",
        ("transformer.h.9",)),
    Row("steer", "model not available offline", ("steer", "run_model_gone", "--prompt", "the cat", "--ablate", "1"),
        "ModelNotAvailableError", ("moved_lm", "no such folder")),
    Row("steer", "missing --prompt", ("steer", "run", "--ablate", "1"), "UsageError", ("--prompt",)),
    # index / retrieve (sparse retrieval, embedding runs)
    Row("index", "missing path", ("index", "nope"), "ConfigError", ("expected a run folder", "nope")),
    Row("index", "an LLM run", ("index", "run"), "ConfigError", ("expected an embedding run",)),
    Row("retrieve", "missing path", ("retrieve", "nope", "--query", "cats"), "ConfigError",
        ("expected a run folder", "nope")),
    Row("retrieve", "missing --query", ("retrieve", "run"), "UsageError", ("--query",)),
    # compare-features / geometry
    Row("compare-features", "missing path", ("compare-features", "nope", "run"), "ConfigError",
        ("expected a run folder", "nope")),
    Row("compare-features", "a run without an SAE", ("compare-features", "run", "run_no_sae"), "MissingArtifactError",
        ("run_no_sae",)),
    Row("compare-features", "unknown level", ("compare-features", "run", "run", "--level", "byte"), "UsageError",
        ("--level", "byte")),
    Row("geometry", "missing path", ("geometry", "nope"), "ConfigError", ("expected a run folder", "nope")),
    Row("steer", "sweep strengths not numbers", ("steer", "run", "--sweep", "--strengths", "a,b"), "ConfigError",
        ("comma-separated numbers", "a,b")),
    Row("steer", "sweep condition not J>T", ("steer", "run", "--sweep", "--feature", "1", "--condition", "3"),
        "ConfigError", ("J>T", "'3'")),
    # contrast
    Row("contrast", "missing path", ("contrast", "nope", "--label", "sentiment", "--positive", "negative"),
        "ConfigError", ("expected a run folder", "nope")),
    Row("contrast", "label that does not exist", ("contrast", "run", "--label", "mood", "--positive", "sad"),
        "ConfigError", ("label 'mood'", "found none", "sentiment")),
    Row("contrast", "positive class without documents",
        ("contrast", "run", "--label", "sentiment", "--positive", "ecstatic"), "ConfigError", ("ecstatic", "found 0")),
    # mdl-select
    Row("mdl-select", "missing path", ("mdl-select", "nope.yaml"), "ConfigError", ("nope.yaml", "no such file"),
        subprocess=True),
    Row("mdl-select", "empty file", ("mdl-select", "empty.yaml"), "ConfigError", ("empty.yaml", "empty")),
    Row("mdl-select", "malformed YAML", ("mdl-select", "malformed.yaml"), "ConfigError", ("not valid YAML",)),
    Row("mdl-select", "not a mapping", ("mdl-select", "list.yaml"), "ConfigError", ("expected a mapping",)),
    Row("mdl-select", "unknown key", ("mdl-select", "mdl_unknown_key.yaml"), "ConfigError",
        ("unknown key 'gird'", "did you mean 'grid'")),
    Row("mdl-select", "a run config where an mdl-select config is expected", ("mdl-select", "good.yaml"),
        "ConfigError", ("unknown key 'corpus'", "valid keys")),
    Row("mdl-select", "missing required key", ("mdl-select", "mdl_missing_key.yaml"), "ConfigError",
        ("missing required key 'output_dir'",)),
    Row("mdl-select", "out-of-range budget", ("mdl-select", "mdl_missing_key.yaml", "--output-dir", "mdl",
                                              "--fvu-budget", "-1"), "ConfigError", ("fvu_budget", "-1")),
    Row("mdl-select", "budget not a number", ("mdl-select", "good.yaml", "--fvu-budget", "low"), "UsageError",
        ("--fvu-budget", "low")),
]


# -- the sweep -------------------------------------------------------------------------------------
def sub_commands(parser: argparse.ArgumentParser) -> set[str]:
    """The sub-commands the CLI registers (its subparsers' names)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name for a in actions for name in a.choices}


def commands_without_rows(commands: set[str], rows: list[Row]) -> set[str]:
    return commands - {r.command for r in rows}


def takes_a_path(parser: argparse.ArgumentParser, command: str) -> bool:
    """Whether the sub-command has a positional argument (a config, run or SAE folder)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return any(not a.option_strings for a in sub.choices[command]._actions)


def test_every_sub_command_has_rows():
    parser = build_parser()
    commands = sub_commands(parser)
    assert {"cache", "train", "eval", "analyze", "browse", "probe", "steer", "mdl-select"} <= commands
    assert not commands_without_rows(commands, ROWS), "sub-commands without rows in the sweep"
    assert not {r.command for r in ROWS} - commands, "rows for sub-commands the CLI does not register"
    without_missing_path = {c for c in commands if takes_a_path(parser, c)} - {
        r.command for r in ROWS if r.mistake == "missing path"}
    assert not without_missing_path, "sub-commands taking a path without a 'missing path' row"


def test_a_new_sub_command_without_rows_is_caught():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.add_parser("explain-everything")
    assert commands_without_rows(sub_commands(parser), ROWS) == {"explain-everything"}


def check_row(row: Row, code: int, stderr: str) -> None:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr, f"{row.id}: traceback on stderr:\n{stderr}"
    assert code == 2, f"{row.id}: exit {code}, expected 2; stderr:\n{stderr}"
    last = lines[-1] if lines else ""
    assert last.startswith(f"saekit {row.command}: {row.error}: "), f"{row.id}: last stderr line {last!r}"
    for text in row.says + ((row.fix,) if row.fix else ()):
        assert text in last, f"{row.id}: expected {text!r} in {last!r}"


def check_files(row: Row, root: Path, before: dict, after: dict) -> None:
    changed = sorted(p for p in before if before[p] != after.get(p))
    assert not changed, f"{row.id}: existing files deleted or overwritten: {changed}"
    allowed = f"{row.may_write}{os.sep}" if row.may_write else None
    new = sorted(p for p in after if p not in before and not (allowed and p.startswith(allowed)))
    assert not new, f"{row.id}: files written outside the run folder: {new}"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_mistake_gets_a_named_error(row: Row, workspace: Path, monkeypatch):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    code, stderr = run_subprocess(list(row.args), workspace) if row.subprocess else run_in_process(list(row.args))
    after = snapshot(workspace)
    if row.may_write:
        shutil.rmtree(workspace / row.may_write, ignore_errors=True)  # the next row starts from the same tree
    check_row(row, code, stderr)
    check_files(row, workspace, before, after)


def test_a_bug_is_a_traceback_and_exit_1(monkeypatch):
    """Anything other than a SaekitError is a bug: it is not dressed up as a one-line error."""
    import saekit.run.config as run_config

    def broken(path, strict=True):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(run_config, "load_run_config", broken)
    with pytest.raises(ZeroDivisionError):
        main(["cache", "x.yaml"])


# -- the Python API: the same mistakes through the public entry points -----------------------------
def _broken_copy(src: Path, dst: Path, name: str, text: str) -> Path:
    shutil.copytree(src, dst)
    (dst / name).write_text(text)
    return dst


def _sae(d_in: int = 8):
    import saekit

    return saekit.create_sae({"architecture": "topk", "d_in": d_in, "d_sae": 16, "k": 2})


def _store(ws: Path):
    import saekit

    return saekit.ActivationStore(ws / "run" / "store")


def _train_cfg():
    import saekit

    return saekit.TrainConfig(total_steps=1, batch_size=4)


API_CASES = {  # id -> (call(workspace, tmp_path), expected error class, substring of the message)
    "load_sae missing path": (lambda ws, tmp: _api().load_sae(ws / "nope"), "MissingArtifactError", "no such folder"),
    "load_sae run without an SAE": (lambda ws, tmp: _api().load_sae(ws / "run_no_sae"), "MissingArtifactError",
                                    "expected an SAE folder"),
    "load_sae folder without weights": (lambda ws, tmp: _api().load_sae(ws / "sae_no_weights"),
                                        "CorruptArtifactError", "sae_weights.safetensors"),
    "load_sae malformed cfg.json": (lambda ws, tmp: _api().load_sae(_broken_copy(
        ws / "run" / "train" / "final_sae", tmp / "sae", "cfg.json", "{")), "CorruptArtifactError", "cfg.json"),
    "ActivationStore missing path": (lambda ws, tmp: _api().ActivationStore(ws / "nope"), "StoreMissingError",
                                     "saekit cache"),
    "ActivationStore hook that does not exist": (lambda ws, tmp: _api().ActivationStore(
        ws / "run" / "store", hook="transformer.h.9"), "HookNotFoundError", "transformer.h.1"),
    "ActivationStore malformed manifest": (lambda ws, tmp: _api().ActivationStore(_broken_copy(
        ws / "run" / "store" / "transformer.h.1", tmp / "store", "manifest.json", "{")),
        "CorruptArtifactError", "manifest.json"),
    "ActivationStore.gather unknown column": (lambda ws, tmp: _store(ws).gather("labels", [0]), "UnknownNameError",
                                              "expected one of"),
    "ActivationStore.meta unknown column": (lambda ws, tmp: _store(ws).meta("labels"), "UnknownNameError",
                                            "expected one of"),
    "create_sae unknown architecture": (lambda ws, tmp: _api().create_sae({"architecture": "topkk", "d_in": 8,
                                                                           "d_sae": 16}), "ConfigError", "topk"),
    "create_sae missing architecture": (lambda ws, tmp: _api().create_sae({"d_in": 8}), "ConfigError",
                                        "architecture"),
    "create_sae not a mapping": (lambda ws, tmp: _api().create_sae(None), "ConfigError", "NoneType"),
    "create_sae wrong type": (lambda ws, tmp: _api().create_sae({"architecture": "topk", "d_in": "eight",
                                                                 "d_sae": 16}), "ConfigError", "'eight'"),
    "create_sae out of range": (lambda ws, tmp: _api().create_sae({"architecture": "topk", "d_in": 8, "d_sae": 16,
                                                                   "k": 99}), "ConfigError", "99"),
    "train batches not a batch source": (lambda ws, tmp: _api().train(_sae(), [_torch().randn(4, 8)], _train_cfg(),
                                                                      tmp / "r"), "ConfigError", "list"),
    "train config as a dict": (lambda ws, tmp: _api().train(_sae(32), _store(ws).batches(4), {"total_steps": 1},
                                                            tmp / "r"), "ConfigError", "TrainConfig"),
    "train SAE width differs from the store": (lambda ws, tmp: _api().train(_sae(8), _store(ws).batches(4),
                                                                            _train_cfg(), tmp / "r"),
                                               "ShapeMismatchError", "d_in=32"),
    "TrainConfig wrong type": (lambda ws, tmp: _api().TrainConfig.from_dict({"lr": "fast", "total_steps": 1}),
                               "ConfigError", "'fast'"),
    "evaluate wrong width": (lambda ws, tmp: _api().evaluate(_sae(), [_torch().randn(4, 5)]), "ShapeMismatchError",
                             "(4, 5)"),
    "load_run_config missing path": (lambda ws, tmp: _api().load_run_config(ws / "nope.yaml"), "ConfigError",
                                     "nope.yaml"),
    "load_run_config empty file": (lambda ws, tmp: _api().load_run_config(ws / "empty.yaml"), "ConfigError",
                                   "empty file"),
    "load_run_config malformed YAML": (lambda ws, tmp: _api().load_run_config(ws / "malformed.yaml"), "ConfigError",
                                       "not valid YAML"),
    "load_documents corpus path typo": (lambda ws, tmp: _corpus(ws / "data" / "mytweets.jsonl"), "ConfigError",
                                        "not a hub dataset name either"),
    "RunFolder.require_run on a store": (lambda ws, tmp: _api().RunFolder(ws / "run" / "store").require_run(),
                                         "ConfigError", "activation store"),
    "load_lm moved model folder": (lambda ws, tmp: _load_lm(str(ws / "moved_lm")), "ModelNotAvailableError",
                                   "no such folder"),
}


def _api():
    import saekit

    return saekit


def _torch():
    import torch

    return torch


def _corpus(path: Path):
    from saekit.data.corpus import CorpusConfig, load_documents

    return load_documents(CorpusConfig(name=str(path)))


def _load_lm(name: str):
    from saekit.sources.models import load_lm

    return load_lm(name)


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_public_api_raises_named_errors(case: str, workspace: Path, tmp_path: Path):
    """A named SaekitError subclass, never a dependency's bare KeyError/FileNotFoundError/JSONDecodeError."""
    from saekit.errors import SaekitError

    call, expected, says = API_CASES[case]
    with pytest.raises(SaekitError) as info:
        call(workspace, tmp_path)
    assert type(info.value).__name__ == expected, f"{case}: {type(info.value).__name__}: {info.value}"
    assert says in str(info.value), f"{case}: expected {says!r} in {str(info.value)!r}"


def test_train_is_callable_after_its_package_is_imported():
    """`saekit.train(...)` (README) keeps working once the `saekit.train` package has been imported."""
    import saekit
    import saekit.train.loop  # noqa: F401 — binds saekit.train to the package

    assert callable(saekit.train) and saekit.train.TrainConfig is saekit.TrainConfig
