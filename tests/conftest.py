"""Shared fixtures: the smoke configuration, a tiny model, Flower task identity."""

from __future__ import annotations

import pytest
import torch

from flhf_core.config import PYPROJECT, RunConfig, load_preset
from flhf_core.model import build_model, shipped_tokenizer

SMOKE = PYPROJECT.parent / "configs" / "smoke.toml"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smoke_config() -> RunConfig:
    return RunConfig.from_mapping(load_preset(SMOKE))


@pytest.fixture(scope="session")
def tokenizer():
    return shipped_tokenizer()


@pytest.fixture
def tiny_model(smoke_config, tokenizer):
    return build_model(smoke_config, tokenizer)


@pytest.fixture
def flower_identity():
    """Messages can only be built where Flower knows the run and node (the ServerApp's role)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
