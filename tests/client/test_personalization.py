"""Personal parameters stay on the client, persist across rounds and restarts, and help."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import client_app
from flhf_core.client import personal
from flhf_core.client.session import open_session
from flhf_core.config import ConfigError, RunConfig
from flhf_core.learning.model import (
    add_lora,
    build_model,
    parameters_to_record,
    personal_parameter_names,
    record_to_parameters,
    tokenizer_fingerprint,
)
from flhf_core.server.aggregation import weighted_average
from flhf_core.server.main import shared_parameter_names
from flhf_core.server.reporting import personal_spread


def run_config(smoke_config, mode, tmp_path):
    # soft-prompt learns from feedback only: its runs need feedback rounds
    feedback = {"feedback-algorithm": "reinforce", "sft-rounds": 1} if mode == "soft-prompt" else {}
    return smoke_config.replace(
        **{"personalization": mode, "results-dir": str(tmp_path / "results"), **feedback}
    )


def new_context(config, state_dir, user=0, users=2):
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": user, "num-partitions": users, "state-dir": str(state_dir)},
        state=RecordDict(),
        run_config=config.to_mapping(),
    )


def server_message(config, tokenizer, kind=MessageType.TRAIN, server_round=1, arrays=None, phase="sft"):
    model = build_model(config, tokenizer)
    shared = shared_parameter_names(model, config)
    if arrays is not None:
        record_to_parameters(model, arrays, names=shared)
    record = ConfigRecord(
        {
            "phase": phase,
            "server-round": server_round,
            "run-name": "run",
            "tokenizer-sha256": tokenizer_fingerprint(tokenizer),
        }
    )
    content = RecordDict({"arrays": parameters_to_record(model, shared), "config": record})
    return Message(content=content, dst_node_id=7, message_type=kind), shared


@pytest.mark.parametrize("mode", ["local-head", "lora", "soft-prompt"])
def test_personal_parameters_never_leave_and_survive_rounds_and_restarts(
    flower_identity, smoke_config, tokenizer, tmp_path, mode
):
    config = run_config(smoke_config, mode, tmp_path)
    sent, shared = server_message(config, tokenizer)
    context = new_context(config, tmp_path / "state")
    reply = client_app.train(sent, context)
    assert set(reply.content["arrays"].keys()) == shared  # only shared parameters travel
    kept = context.state.array_records[personal.STATE_RECORD]
    assert kept and not set(kept.keys()) & shared
    assert reply.content["metrics"]["state-from-context"] == 0.0

    again = client_app.train(server_message(config, tokenizer, server_round=2)[0], context)
    assert again.content["metrics"]["state-from-context"] == 1.0

    state_file = personal.state_dir(context, config, "run", 0) / personal.STATE_FILE
    saved = {k: v.numpy().copy() for k, v in context.state.array_records[personal.STATE_RECORD].items()}
    restarted = new_context(config, tmp_path / "state")  # a new SuperNode: empty Context.state
    session = open_session(server_message(config, tokenizer, server_round=3)[0], restarted)
    assert session.restored.source == "file" and state_file.is_file()
    restored = parameters_to_record(session.model, session.personal_names)
    assert all(np.array_equal(restored[k].numpy(), saved[k]) for k in saved)


def test_the_conditioning_learns_from_feedback_only_and_first(
    flower_identity, smoke_config, tokenizer, tmp_path
):
    """soft-prompt: a supervised round leaves the conditioning at zero; a feedback round trains
    it (personal pass first) and, at feedback-learning-rate 0, nothing else."""
    config = run_config(smoke_config, "soft-prompt", tmp_path).replace(
        **{
            "feedback-algorithm": "reinforce",
            "sft-rounds": 1,
            "feedback-learning-rate": 0.0,
            "feedback-steps": 2,
            "feedback-prompts": 2,
        }
    )
    context = new_context(config, tmp_path / "state")
    sent, shared = server_message(config, tokenizer)
    client_app.train(sent, context)
    kept = context.state.array_records[personal.STATE_RECORD]
    assert set(kept.keys()) == {"user_conditioning.offset", "user_conditioning.decoder_offset"}
    assert not any(a.numpy().any() for a in kept.values())  # supervised: untouched

    sent, _ = server_message(config, tokenizer, server_round=2, phase="feedback")
    reply = client_app.train(sent, context)
    kept = context.state.array_records[personal.STATE_RECORD]
    assert all(a.numpy().any() for a in kept.values())  # both parts learned
    assert set(reply.content["arrays"].keys()) == shared
    received = sent.content["arrays"]
    assert all(np.array_equal(reply.content["arrays"][k].numpy(), received[k].numpy()) for k in shared)
    assert "personal-loss" not in reply.content["metrics"]  # one pass: its figures are train-*
    # the rate it ran at: the personal one, not the supervised schedule's
    assert reply.content["metrics"]["train-learning-rate"] == config.personal_feedback_learning_rate


def test_a_corrupt_state_file_is_reported_kept_and_the_user_starts_fresh(
    flower_identity, smoke_config, tokenizer, tmp_path
):
    config = run_config(smoke_config, "local-head", tmp_path)
    context = new_context(config, tmp_path / "state")
    state_file = personal.state_dir(context, config, "run", 0) / personal.STATE_FILE
    state_file.parent.mkdir(parents=True)
    state_file.write_bytes(b"not a safetensors file")
    reply = client_app.train(server_message(config, tokenizer)[0], context)
    assert reply.content["metrics"]["state-unreadable"] == 1.0
    assert state_file.with_name(state_file.name + ".corrupt").read_bytes() == b"not a safetensors file"
    shapes = {k: tuple(v.shape) for k, v in context.state.array_records["personal"].items()}
    restored = personal.restore(
        new_context(config, tmp_path / "state"), state_file.parent, "local-head", shapes
    )
    assert restored.source == "file"


def test_evaluation_compares_global_and_personalized(flower_identity, smoke_config, tokenizer, tmp_path):
    config = run_config(smoke_config, "lora", tmp_path)
    context = new_context(config, tmp_path / "state")
    client_app.train(server_message(config, tokenizer)[0], context)
    metrics = client_app.evaluate(
        server_message(config, tokenizer, MessageType.EVALUATE)[0], context
    ).content["metrics"]
    for key in ("reward", "reward-personal", "rougeL", "rougeL-personal", "personalization-gain"):
        assert key in metrics, key
    assert metrics["personalization-gain"] == pytest.approx(metrics["reward-personal"] - metrics["reward"])


@pytest.mark.slow
def test_personalized_models_beat_the_global_one_for_most_aspect_users(
    flower_identity, smoke_config, tokenizer, tmp_path
):
    """Three users who each want another aspect of the same papers (challenge, approach,
    outcome), never saying which (neutral prompt): after a few federated rounds of the real
    ClientApp and FedAvg, each user's LoRA-personalized model earns more of that user's reward
    on held-out documents than the global model alone, for at least two of the three."""
    users, rounds = 3, 5
    config = smoke_config.replace(
        **{
            "personalization": "lora",
            "partitioning": "preference",
            "user-profiles": "aspects",
            "tiny-t5-size": "s",
            "local-epochs": 2,
            "learning-rate": 0.003,
            "num-server-rounds": rounds,
            "sft-rounds": rounds,
            "results-dir": str(tmp_path / "results"),
        }
    )
    contexts = [new_context(config, tmp_path / "state", user, users) for user in range(users)]
    arrays = None
    for server_round in range(1, rounds + 1):
        replies = [
            client_app.train(
                server_message(config, tokenizer, server_round=server_round, arrays=arrays)[0], c
            )
            for c in contexts
        ]
        counts = [float(r.content["metrics"]["num-examples"]) for r in replies]
        averaged = weighted_average(
            [{k: a.numpy() for k, a in r.content["arrays"].items()} for r in replies],
            [n / sum(counts) for n in counts],
        )
        arrays = ArrayRecord({k: Array(v) for k, v in averaged.items()})
    evaluation = server_message(config, tokenizer, MessageType.EVALUATE, rounds, arrays)[0]
    gains = [client_app.evaluate(evaluation, c).content["metrics"]["personalization-gain"] for c in contexts]
    assert sum(g > 0 for g in gains) >= 2, gains


def test_lora_state_save_and_load_round_trip(smoke_config, tokenizer, tmp_path, logits_of):
    model = add_lora(build_model(smoke_config, tokenizer), rank=4, seed=1)
    names = personal_parameter_names(model, "lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    path = personal.persist(context, tmp_path, parameters_to_record(model, names), "lora", 3)
    fresh = add_lora(build_model(smoke_config, tokenizer), rank=4, seed=2)
    assert personal.load_into(fresh, path) == "lora"
    assert torch.allclose(logits_of(model), logits_of(fresh))


def test_local_head_refuses_a_tied_head(tmp_path, tied_t5):
    run = RunConfig(model=str(tmp_path), personalization="local-head")
    with pytest.raises(ConfigError, match="ties its head to the input embedding"):
        shared_parameter_names(tied_t5, run)
    assert shared_parameter_names(tied_t5, run.replace(personalization="lora"))  # lora fits


def test_personalization_gain_figures():
    users = {
        0: {"reward-personal": 0.3, "personalization-gain": 0.1},
        1: {"reward-personal": 0.2, "personalization-gain": -0.05},
        2: {"reward-personal": 0.4, "personalization-gain": 0.2},
    }
    spread = personal_spread(users)
    assert spread["personalization-gain"] == pytest.approx(0.25 / 3)
    assert spread["personalization-gain-worst"] == -0.05 and spread["reward-personal-worst"] == 0.2
    assert spread["users-helped"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("problem", ["other-rank", "wrong-shape", "non-finite"])
def test_a_state_file_that_does_not_fit_is_reported_kept_and_the_user_starts_fresh(
    flower_identity, smoke_config, tokenizer, tmp_path, problem
):
    """Right names, wrong content: another lora-rank, a wrong shape, NaN. The user trains
    every round from a fresh adapter instead of failing every round."""
    config = run_config(smoke_config, "lora", tmp_path)
    model = add_lora(build_model(config, tokenizer), rank=4 if problem == "other-rank" else 8, seed=1)
    arrays = {
        k: v.numpy().copy()
        for k, v in parameters_to_record(model, personal_parameter_names(model, "lora")).items()
    }
    name = sorted(arrays)[0]
    if problem == "wrong-shape":
        arrays[name] = arrays[name][:-1]
    elif problem == "non-finite":
        arrays[name][0] = np.nan
    context = new_context(config, tmp_path / "state")
    folder = personal.state_dir(context, config, "run", 0)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    state_file = personal.persist(
        Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
        folder,
        record,
        "lora",
        0,  # written before round 1
    )
    original = state_file.read_bytes()
    reply = client_app.train(server_message(config, tokenizer)[0], context)
    metrics = reply.content["metrics"]
    assert metrics["state-unreadable"] == 1.0 and metrics["state-from-file"] == 0.0
    assert np.isfinite(metrics["train-loss"])
    assert state_file.with_name(state_file.name + ".corrupt").read_bytes() == original  # the evidence is kept
    again = client_app.train(server_message(config, tokenizer, server_round=2)[0], context)
    assert again.content["metrics"]["state-from-context"] == 1.0  # the fresh adapter lives on


@pytest.mark.parametrize(
    ("personal_names", "shared_lr", "expected"),
    [
        (frozenset(), 3e-4, [("train", None, 3e-4)]),
        (frozenset({"p"}), 3e-4, [("personal", {"p"}, 1e-2), ("train", {"s"}, 3e-4)]),
        (frozenset({"p"}), 0.0, [("train", {"p"}, 1e-2)]),
    ],
)
def test_feedback_trains_the_personal_parameters_first_each_at_its_own_rate(
    personal_names, shared_lr, expected
):
    from types import SimpleNamespace

    from flhf_core.client.update import feedback_passes

    config = RunConfig(
        personalization="lora" if personal_names else "none",
        feedback_learning_rate=shared_lr,
        personal_feedback_learning_rate=1e-2,
    )
    session = SimpleNamespace(config=config, personal_names=personal_names, shared_names=frozenset({"s"}))
    assert feedback_passes(session) == expected


def test_code_bandit_rates_codes_keeps_its_state_and_serves_its_best_code(
    flower_identity, smoke_config, tokenizer, tmp_path
):
    """code-bandit: a feedback round spends the user's judgements on codes, the shared model is
    sent back unchanged, the state stays on the device, and the user's own model is asked with
    the code the bandit serves."""
    from flhf_core.client.session import open_session
    from flhf_core.data.codes import all_codes
    from flhf_core.learning.code_bandit import bandit_of

    config = smoke_config.replace(
        **{
            "personalization": "code-bandit",
            "results-dir": str(tmp_path / "results"),
            "partitioning": "codes",
            "feedback-algorithm": "reinforce",
            "sft-rounds": 1,
            "feedback-learning-rate": 0.0,
            "ratings-per-round": 12,
        }
    )
    context = new_context(config, tmp_path / "state")
    sent, shared = server_message(config, tokenizer, phase="feedback")
    reply = client_app.train(sent, context)
    assert set(reply.content["arrays"].keys()) == shared
    received = sent.content["arrays"]
    assert all(np.array_equal(reply.content["arrays"][k].numpy(), received[k].numpy()) for k in shared)
    kept = context.state.array_records[personal.STATE_RECORD]
    counts = kept["code_bandit.counts"].numpy()
    metrics = reply.content["metrics"]
    assert counts.sum() == metrics["train-ratings-used"] == 12  # declines cost nothing
    # no figure of its own under a name the server gives another (train-reward: the reward's)
    assert not [k for k in metrics if k.startswith("train-") and k.removeprefix("train-") in metrics]
    session = open_session(server_message(config, tokenizer, server_round=2, phase="feedback")[0], context)
    best = all_codes(config.aspects)[bandit_of(session.model).bandit().best()]
    assert {e.instruction for e in session.as_asked(session.data.reward)} == {best.prompt}


def test_code_bandit_needs_codes_and_a_still_shared_model(smoke_config):
    feedback = {"feedback-algorithm": "reinforce", "sft-rounds": 1}
    with pytest.raises(ConfigError, match="partitioning='codes'"):
        smoke_config.replace(personalization="code-bandit", **{"feedback-learning-rate": 0.0, **feedback})
    with pytest.raises(ConfigError, match="set it to 0"):
        smoke_config.replace(personalization="code-bandit", partitioning="codes", **feedback)
    with pytest.raises(ConfigError, match="reward-model"):
        smoke_config.replace(
            personalization="code-bandit",
            partitioning="codes",
            **{"feedback-learning-rate": 0.0, "reward-model": "personal", **feedback},
        )
    with pytest.raises(ConfigError, match="never trains"):
        smoke_config.replace(
            personalization="code-bandit", partitioning="codes", **{"feedback-learning-rate": 0.0}
        )


def test_a_supervised_round_leaves_a_code_bandit_alone(flower_identity, smoke_config, tokenizer, tmp_path):
    """personal-epochs > 0 alternates only for parameters that learn from examples (an empty
    personal pass would fail: the bandit's state has nothing to train)."""
    config = smoke_config.replace(
        **{
            "personalization": "code-bandit",
            "partitioning": "codes",
            "feedback-algorithm": "reinforce",
            "sft-rounds": 1,
            "feedback-learning-rate": 0.0,
            "personal-epochs": 1,
            "results-dir": str(tmp_path / "results"),
        }
    )
    context = new_context(config, tmp_path / "state")
    reply = client_app.train(server_message(config, tokenizer)[0], context)
    assert "personal-loss-first" not in reply.content["metrics"]
    kept = context.state.array_records[personal.STATE_RECORD]
    assert not kept["code_bandit.counts"].numpy().any()
