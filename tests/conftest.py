"""Shared fixtures: the smoke configuration, a tiny model, Flower task identity."""

from __future__ import annotations

import pytest
import torch

from flhf_core.config import PYPROJECT, RunConfig, load_preset
from flhf_core.learning.model import build_model, shipped_tokenizer

SMOKE = PYPROJECT.parent / "configs" / "smoke.toml"

torch.set_num_threads(2)


# Overrides that keep an end-to-end run through Flower short (short texts, few evaluated
# examples) where a test checks what a run does, not how well the model learns.
SHORT_TEXTS = [
    "max-source-tokens=48",
    "max-target-tokens=16",
    "max-new-tokens=12",
    "eval-max-examples=4",
    "heldout-max-examples=8",
    "reward-documents=4",
]


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


@pytest.fixture
def tied_t5(tokenizer):
    """A tiny T5 with the usual tied head, standing in for a Hugging Face checkpoint."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


@pytest.fixture
def logits_of(tokenizer):
    """A model's logits on one fixed (source, target) pair, in eval mode."""

    def logits(model):
        batch = tokenizer(["summarize: we propose a method for parsing"], return_tensors="pt")
        labels = tokenizer(text_target=["they propose a parser"], return_tensors="pt")["input_ids"]
        model.eval()
        with torch.no_grad():
            return model(**batch, labels=labels).logits

    return logits


@pytest.fixture
def in_process_grid():
    from flhf_core.runs.inprocess import InProcessGrid

    return InProcessGrid


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """``hub_checkpoint(family)``: the folder of a tiny stand-in for a hub checkpoint, ``flan-t5``
    or ``bart`` (``tests/hub_checkpoints.py``), saved once per session."""
    from hub_checkpoints import SAVERS

    folders = {}

    def folder(family: str):
        if family not in folders:
            folders[family] = SAVERS[family](tmp_path_factory.mktemp(family))
        return folders[family]

    return folder
