"""Shared fixtures: the embedded default models, loaded once per test session (offline).

Offline is enforced, not defaulted (docs/RELIABILITY.md 37): the hub clients' offline switches are forced
on whatever the caller's environment says, and `support.network_guard` refuses every connection and name
lookup to a host other than this machine (tests/test_offline_suite.py proves both)."""

from __future__ import annotations

import os

import pytest
import torch
from support import network_guard, tiers

os.environ["HF_HUB_OFFLINE"] = "1"  # forced: a caller's HF_HUB_OFFLINE=0 does not put the suite online
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
network_guard.install()


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct."""
    from saekit.sources.models import load_lm

    return load_lm("default")


@pytest.fixture(scope="session")
def smollm_lens(smollm):
    from saekit.sources.models import load_lens

    return load_lens("default")


@pytest.fixture(scope="session")
def minilm():
    from saekit.sources.models import load_embedder

    return load_embedder("default")


@pytest.fixture(scope="session")
def tweets():
    from saekit.data.corpus import CorpusConfig, load_documents

    return load_documents(CorpusConfig(max_docs=400))


@pytest.fixture
def one_thread():
    """Tiny training loops: one thread avoids oversubscription and barrier stalls on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_TIERS = tiers.TierClock()


def pytest_runtest_logreport(report):
    _TIERS.add(report)


def pytest_terminal_summary(terminalreporter):
    """Each tier's summed time next to its budget (reported, not asserted: support/tiers.py says why)."""
    if _TIERS.seconds:
        terminalreporter.write_sep("-", "tier times (docs/RELIABILITY.md 37)")
        for line in _TIERS.lines():
            terminalreporter.write_line(line)
