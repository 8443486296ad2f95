"""The Triton sparse kernels (saekit/sae/kernels/triton_sparse.py) against the eager references,
on CPU through Triton's interpreter. The interpreter has to be chosen before Triton is first
imported, so the checks run in a child pytest with TRITON_INTERPRET=1. Skipped where Triton is not
installed (listed in tests/QUARANTINES.md); a CUDA machine runs the same kernels compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from saekit.sae.kernels.sparse import embed_sum_ref, gather_dot_ref, sparse_t_matmul_ref  # noqa: E402

CHILD = os.environ.get("TRITON_INTERPRET") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs inside test_kernels_under_the_interpreter's child")


def test_kernels_under_the_interpreter():
    if CHILD:
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "4 passed" in res.stdout  # this test and the three checks below really ran


def _case(dtype, B=6, K=3, F=20, D=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, F, (B, K), generator=g)
    idx[0, 1] = idx[0, 0]  # a repeated latent in one row: contributions add
    w = torch.randn(B, K, generator=g)
    return idx, w, torch.randn(F, D, generator=g).to(dtype), torch.randn(B, D, generator=g).to(dtype)


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sparse_kernels_match_the_references(dtype):
    from saekit.sae.kernels import triton_sparse as ts

    assert ts.available(torch.zeros(1))
    idx, w, table, rows = _case(dtype)
    t32, r32 = table.float(), rows.float()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ts.embed_sum(idx, w, table), embed_sum_ref(idx, w, t32), **tol)
    torch.testing.assert_close(ts.gather_dot(idx, table, rows), gather_dot_ref(idx, t32, r32), **tol)
    torch.testing.assert_close(ts.sparse_t_matmul(idx, w, rows, 20), sparse_t_matmul_ref(idx, w, r32, 20), **tol)


@child_only
def test_triton_kernels_handle_widths_past_one_block():
    from saekit.sae.kernels import triton_sparse as ts

    idx, w, table, rows = _case(torch.float32, D=300)  # two d-blocks of 256, the second masked
    torch.testing.assert_close(ts.embed_sum(idx, w, table), embed_sum_ref(idx, w, table))
    torch.testing.assert_close(ts.gather_dot(idx, table, rows), gather_dot_ref(idx, table, rows))
