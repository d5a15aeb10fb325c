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


class InProcessGrid:
    """Flower's Grid, minus the network: messages go to the real ClientApp handlers in this
    process, each node with its own Context (partition-id, num-partitions, state).

    ``tamper(sent, reply)`` may replace a reply (a misbehaving client); a handler that raises
    answers with an error reply, as Flower's ClientApp runtime does.
    """

    def __init__(self, run_config: dict, users: int, tamper=None, first_node_id: int = 1000):
        from flwr.app import Context, RecordDict

        self.tamper = tamper
        self.contexts = {
            first_node_id + 7 * user: Context(
                run_id=1,
                node_id=first_node_id + 7 * user,
                node_config={"partition-id": user, "num-partitions": users},
                state=RecordDict(),
                run_config=run_config,
            )
            for user in range(users)
        }
        self.delivered: list = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message, MessageType

        import client_app

        handlers = {
            MessageType.TRAIN: client_app.train,
            MessageType.EVALUATE: client_app.evaluate,
            MessageType.QUERY: client_app.query,
        }
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what the SuperLink does
            self.delivered.append(message)
            handler = handlers[message.metadata.message_type]
            try:
                reply = handler(message, self.contexts[message.metadata.dst_node_id])
            except Exception as error:
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            if self.tamper is not None:
                reply = self.tamper(message, reply)
            replies.append(reply)
        return replies


@pytest.fixture
def in_process_grid():
    return InProcessGrid
