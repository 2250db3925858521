"""Shared fixtures. No test may reach the network: the hub is forced offline before anything imports it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: no spin-wait on a shared machine
os.environ.setdefault("BILEVEL_WORKERS", "1")  # arms and cells in turn: a worker's start-up outweighs a 10-step test arm

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny problems and small batches: a second intra-op thread only adds contention (OpenMP spin-waiting made
    them 15x slower on a busy 2-core machine). Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipe():
    """The shipped tiny teacher pipeline (frozen)."""
    from bilevel.worlds.models import load_tiny_pipeline

    return load_tiny_pipeline("tiny")


@pytest.fixture()
def random_pipe():
    """An untrained tiny pipeline: for tests that need the architecture, not the quality."""
    from bilevel.worlds.tiny.architecture import build_tiny_pipeline

    return build_tiny_pipeline(0)
