"""Every public name of `saekit` works whatever was accessed or imported before (issue 14).

Each order runs in a fresh interpreter: what `saekit.train` is depends on what the process
imported earlier (a sub-package bound under a public name), which one process cannot undo.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import saekit

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = sorted(n for n in saekit.__all__ if n != "__version__")

# Accesses every name in the given order, then checks each against the object it stands for:
# the object itself, or a sub-package of the same name that forwards calls to it (checked by
# swapping the target for a sentinel, so a module that merely looks callable does not pass).
_CHILD = """
import importlib, json, sys
order, imports_first = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for m in imports_first:
    importlib.import_module(m)
import saekit
got = {name: getattr(saekit, name) for name in order}
problems = []
for name in order:
    module, attr = saekit._LAZY[name]
    target = getattr(importlib.import_module(module), attr)
    obj = getattr(saekit, name)
    if obj is not got[name]:
        problems.append(f"{name}: a second access gave another object")
    if obj is target:
        continue
    if not callable(target) or not callable(obj):
        problems.append(f"{name}: {obj!r} is not {target!r}")
        continue
    setattr(sys.modules[module], attr, lambda *a, **k: ("sentinel", a, k))
    try:
        if obj(1, x=2) != ("sentinel", (1,), {"x": 2}):
            problems.append(f"{name}: calling {obj!r} does not call {module}.{attr}")
    finally:
        setattr(sys.modules[module], attr, target)
from saekit import *  # noqa: F403
print(json.dumps({"problems": problems, "dir_ok": set(saekit.__all__) <= set(dir(saekit))}))
"""

ORDERS = {
    "sorted": (PUBLIC, []),
    "reversed": (PUBLIC[::-1], []),
    "config_before_function": (["TrainConfig", "train", "load_run_config", "run_all"] + PUBLIC, []),
    "subpackages_imported_first": (PUBLIC, ["saekit.train.loop", "saekit.train.checkpoint", "saekit.run.stages",
                                            "saekit.store.reader", "saekit.eval.report"]),
}


@pytest.mark.parametrize("case", sorted(ORDERS))
def test_every_public_name_in_any_order(case):
    order, imports_first = ORDERS[case]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(order), json.dumps(imports_first)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"problems": [], "dir_ok": True}


def test_train_after_trainconfig_trains(tmp_path):
    """The exact report: `saekit.TrainConfig(...)` first, then `saekit.train(...)` as a separate statement."""
    code = f"""
import torch, saekit
cfg = saekit.TrainConfig(total_steps=3, batch_size=16, progress_bar=False, checkpoint_every=0)
sae = saekit.create_sae({{"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2}})
import saekit.store.batches as b
batches = b.TensorBatches(torch.randn(64, 8), batch_size=16)
saekit.train(sae, batches, cfg, {str(tmp_path / "run")!r})
print(saekit.load_sae({str(tmp_path / "run")!r}).cfg.d_sae)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "16"


def test_subpackage_imports_still_work_after_the_function_was_used():
    code = ("import saekit; saekit.train; import saekit.train.checkpoint as ck; from saekit.train import loop; "
            "print(ck.__name__, loop.__name__, saekit.train.TrainConfig is saekit.TrainConfig)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["saekit.train.checkpoint", "saekit.train.loop", "True"]
