"""Checkpoints and resume: a run killed with SIGKILL goes on from its last checkpoint and ends
exactly where an uninterrupted run ends; a resume that would change the experiment, or that
starts from a corrupt checkpoint, is refused and leaves the folder as it was."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHORT_TEXTS
from flower_runs import check_feedback_run, flhf_background, processes_mentioning
from flwr.app import Array, ArrayRecord, Context, RecordDict
from safetensors.numpy import load_file

from flhf_core.client import personal, reward_state
from flhf_core.config import RunConfig
from flhf_core.learning.algorithms import OBJECTIVE_VERSIONS
from flhf_core.results.checkpoint import (
    REWARD_MODEL_FORMAT,
    CheckpointError,
    check_resumable,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from flhf_core.results.tracking import read_metrics
from flhf_core.runs import cli
from flhf_core.runs.inprocess import run_in_process

# The killed run and its uninterrupted twin: 4 rounds (1 supervised, 3 of REINFORCE on the
# users' feedback), history reward weighting (the users' reward history is part of a
# checkpoint) and a personal LoRA adapter per user (so the users' own state must be replayed
# correctly too), 1 torch thread per user in both.
# Checkpoints after rounds 2 and 4 only: the run is killed once a user has trained round 3 and
# saved its adapter, so the resumed round 3 must start that user from its round-2 version.
RUN = ["feedback-smoke", "num-server-rounds=4", "checkpoint-every=2", "reward-weighting=history"]
RUN += ["max-client-weight=0.6", "personalization=lora", "lora-rank=4", *SHORT_TEXTS]
# ... and clustered reward models learned from 6 judgements per user and round: the server's
# models and assignment are in its checkpoint, each user's model and judgements (with the
# gate's checks of the model, reward-model-trust at its default) in its versions
RUN += ["ratings-per-round=6", "reward-model=clustered"]
RUN += ["--cpus-per-user", "1", "--quiet"]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    """A finished run (in-process, 2 rounds) to resume from in the bad-input tests."""
    results = tmp_path_factory.mktemp("checkpointed")
    items = ["personalization=lora", "lora-rank=4", *SHORT_TEXTS, f"results-dir={results}"]
    return run_in_process(RunConfig.from_mapping(cli.merged_config("smoke", items)), 2)


def comparable(row: dict) -> dict:
    """A row without what legitimately differs between two runs: time, and where a user's
    personal state was read from (memory in one process, its file after a restart)."""
    return {
        k: v
        for k, v in row.items()
        if "seconds" not in k and "per-second" not in k and "state-from" not in k and k != "torch-threads"
    }


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [(r["round"], r["scope"], r["client"]) for r in got] == [
        (r["round"], r["scope"], r["client"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        g, w = comparable(g), comparable(w)
        assert g.keys() == w.keys(), (g["round"], g["scope"], g.keys() ^ w.keys())
        for key, value in w.items():
            if isinstance(value, float) and math.isfinite(value):
                assert g[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (w["round"], w["client"], key)
            else:
                assert g[key] == value, (w["round"], w["client"], key)


def descendants(pid: int) -> list[int]:
    children = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.flower
def test_a_run_killed_after_round_2_of_4_resumes_to_the_uninterrupted_metrics_and_model(tmp_path):
    """Two runs of one experiment at once, each launcher with its SuperLink: one is killed with
    SIGKILL (SuperLink, ServerApp, simulated users) in round 3, after its round-2 checkpoint,
    and resumed; the other runs undisturbed. Both end with the same rows, model and users'
    adapters, and the killed attempt's logs are kept."""
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # nothing shared through ~/.flwr either
    uninterrupted = flhf_background("run", *RUN, f"results-dir={tmp_path}", "run-name=uninterrupted", env=env)
    killed = flhf_background("run", *RUN, f"results-dir={tmp_path}", "run-name=killed", env=env)
    run_dir = tmp_path / "killed"

    def a_user_saved_round_3() -> bool:
        return any(3 in personal.versions(run_dir / "users" / f"user-{user}") for user in (0, 1))

    deadline = time.monotonic() + 300
    while not a_user_saved_round_3():
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
        time.sleep(0.05)
    assert (run_dir / "checkpoints" / "latest" / "round.txt").read_text().strip() == "2"
    superlink = [
        p for p in descendants(killed.pid) if b"superlink" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    for pid in [pid for s in superlink for pid in [s, *descendants(s)]]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed_out, _ = killed.communicate(timeout=120)
    assert killed.returncode == 1 and "superlink-vanished" in killed_out, killed_out  # the launcher says so
    assert max(r["round"] for r in read_metrics(run_dir / "metrics.jsonl")) < 4
    assert json.loads((run_dir / "flower-run.json").read_text())["status"] == "superlink-vanished"
    reference_out, reference_err = uninterrupted.communicate(timeout=400)
    assert uninterrupted.returncode == 0, reference_out + reference_err  # the other run never noticed
    reference = tmp_path / "uninterrupted"

    resumed = flhf_background("run", "--resume", str(run_dir), "--quiet", "--cpus-per-user", "1", env=env)
    resumed_out, resumed_err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, resumed_out + resumed_err
    assert "resuming" in resumed_out and "after round 2 of 4" in resumed_out
    assert json.loads((run_dir / "summary.json").read_text())["resumed-after-rounds"] == [2]
    assert json.loads((run_dir / "flower-run.attempt-1.json").read_text())["status"] == "superlink-vanished"
    assert (run_dir / "metrics.before-resume.jsonl").is_file()
    assert_same_rows(read_metrics(run_dir / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl"))
    for name in ("model/model.safetensors", "checkpoints/latest/model.safetensors"):
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name
    history = [
        json.loads((d / "checkpoints" / "latest" / "state.json").read_text())["strategy"]["reward-history"]
        for d in (run_dir, reference)
    ]
    assert history[0].keys() == history[1].keys() == {"0", "1"}
    for user, rewards in history[1].items():  # every round's reward, the ones before the kill restored
        assert len(rewards) == 4 and history[0][user] == pytest.approx(rewards, rel=1e-6)
    for user in (0, 1):  # each user's adapter and reward model end where the uninterrupted run's do
        for name in (personal.STATE_FILE, reward_state.STATE_FILE):
            state = f"users/user-{user}/{name}"
            got, want = load_file(run_dir / state), load_file(reference / state)
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), state
    saved = [load_checkpoint(d).strategy_arrays for d in (run_dir, reference)]
    assert saved[1] and saved[0].keys() == saved[1].keys()  # the clusters' reward models
    assert all(np.array_equal(saved[0][k], saved[1][k]) for k in saved[1])

    check_feedback_run(reference, tmp_path)  # what a feedback run with adapters holds
    ports = {
        line.split("127.0.0.1:")[1].split()[0]
        for out in (killed_out, reference_out, resumed_out)
        for line in out.splitlines()
        if "SuperLink of this run" in line
    }
    assert len(ports) == 3
    time.sleep(1)
    assert not [p for port in ports for p in processes_mentioning(f"--port {port}")], "a SuperLink was left"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(*args: str) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(list(args)) == 2
    return err.getvalue()


def test_a_resume_that_changes_the_experiment_is_refused_and_names_what_differs(tmp_path, checkpointed):
    run_dir = shutil.copytree(checkpointed, tmp_path / "run")
    before = snapshot(run_dir)
    error = cli_error("run", "--resume", str(run_dir), "seed=7", "lora-rank=8", "num-server-rounds=6")
    assert "seed: 42 in the checkpoint, 7 now" in error and "lora-rank: 4 in the checkpoint, 8 now" in error
    assert "num-server-rounds" not in error.split("may change only")[0]  # extending a run is allowed
    assert "below the checkpoint's round" in cli_error("run", "--resume", str(run_dir), "num-server-rounds=1")
    assert "no preset" in cli_error("run", "--resume", str(run_dir), "smoke")
    config, users = cli.resumed_config(run_dir, ["num-server-rounds=6", "round-timeout=30"])  # allowed
    assert (
        config["num-server-rounds"] == 6 and config["resume"] and config["run-name"] == "run" and users == 2
    )
    assert "the run has 2 users" in cli_error("run", "--resume", str(run_dir), "--users", "3")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["model", "state", "missing"])
def test_a_corrupt_checkpoint_is_refused_and_the_folder_stays_as_it_was(tmp_path, checkpointed, damage):
    run_dir = shutil.copytree(checkpointed, tmp_path / "run")
    latest = run_dir / "checkpoints" / "latest"
    if damage == "model":  # one flipped byte in the weights
        data = bytearray((latest / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (latest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "state":  # a torn state file
        (latest / "state.json").write_text((latest / "state.json").read_text()[:100])
    else:
        shutil.rmtree(latest)
    before = snapshot(run_dir)
    error = cli_error("run", "--resume", str(run_dir))
    expected = {"model": "does not match its sha256", "state": "is corrupt", "missing": "no checkpoint"}
    assert expected[damage] in error
    with pytest.raises(CheckpointError):
        load_checkpoint(run_dir)
    assert snapshot(run_dir) == before


def test_a_resume_across_a_change_of_the_reward_models_layout_is_refused(tmp_path, checkpointed):
    """A checkpoint of a run with a reward model, written before the layout marker (layout 1),
    or by another layout, is refused: the users' saved models would not load, and each would
    go on without its judgements. Runs without a reward model are not concerned."""
    run_dir = shutil.copytree(checkpointed, tmp_path / "run")
    state_path = run_dir / "checkpoints" / "latest" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["reward-model-format"] == REWARD_MODEL_FORMAT  # what this FLHF writes
    del state["reward-model-format"], state["config"]["reward-model-length-learning-rate"]  # as before both
    state_path.write_text(json.dumps(state))
    load_checkpoint(run_dir)  # no reward model: nothing to refuse
    state["config"]["reward-model"] = "personal"
    state_path.write_text(json.dumps(state))
    with pytest.raises(
        CheckpointError, match=f"saved in layout 1, this FLHF reads layout {REWARD_MODEL_FORMAT}"
    ):
        load_checkpoint(run_dir)
    state["config"]["reward-model-length-learning-rate"] = 0.03  # came with layout 2, before the marker
    state_path.write_text(json.dumps(state))
    assert load_checkpoint(run_dir).config["reward-model"] == "personal"
    state["reward-model-format"] = REWARD_MODEL_FORMAT + 1  # a later FLHF's
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=f"saved in layout {REWARD_MODEL_FORMAT + 1}"):
        load_checkpoint(run_dir)


def test_a_resume_across_a_change_of_the_algorithms_objective_is_refused(tmp_path, checkpointed):
    """A checkpoint made when the run's feedback algorithm optimized another objective (its
    version in OBJECTIVE_VERSIONS) is refused: the resumed rounds would optimize another loss
    than the first ones, silently. Without the "objective" key: version 1 before the layout
    marker, ppo's 2 with it (55d71c0 came first); before its first feedback round: no refusal."""
    run_dir = shutil.copytree(checkpointed, tmp_path / "run")
    state_path = run_dir / "checkpoints" / "latest" / "state.json"
    state = json.loads(state_path.read_text())
    algorithm = state["config"]["feedback-algorithm"]
    assert state["objective"] == OBJECTIVE_VERSIONS[algorithm]  # what this FLHF writes
    del state["objective"], state["reward-model-format"]  # as before both markers: version 1
    state["config"]["feedback-algorithm"], state["config"]["sft-rounds"] = "ppo", 0
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"ppo rounds optimized objective version 1, .* version 2"):
        load_checkpoint(run_dir)
    state["config"]["sft-rounds"] = state["round"]  # no feedback round yet: nothing optimized
    state_path.write_text(json.dumps(state))
    load_checkpoint(run_dir)
    state["config"]["sft-rounds"] = 0
    state["reward-model-format"] = REWARD_MODEL_FORMAT  # after 55d71c0, before "objective"
    state_path.write_text(json.dumps(state))
    assert load_checkpoint(run_dir).config["feedback-algorithm"] == "ppo"
    del state["reward-model-format"]
    state["config"]["feedback-algorithm"] = "dpo"  # its loss has not changed: version 1 still
    state_path.write_text(json.dumps(state))
    assert load_checkpoint(run_dir).config["feedback-algorithm"] == "dpo"


def test_a_checkpoint_holds_the_pending_round_and_restores_the_rng_states(checkpointed):
    checkpoint = load_checkpoint(checkpointed)
    assert checkpoint.server_round == 2 and checkpoint.config["num-server-rounds"] == 2
    assert checkpoint.pending is not None and checkpoint.pending.server_round == 2  # rows not yet written
    assert sorted(checkpoint.pending.train.user_metrics) == [0, 1]
    assert max(r["round"] for r in checkpoint.rows) == 1
    saved = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_versions_to_keep_covers_every_round_a_resume_can_go_back_to():
    # checkpoint every 2 rounds, writing round 7: a resume may restart after round 5, 6 or 7
    assert personal.versions_to_keep([1, 2, 3, 4, 6], current=7, window=2) == {4, 6}
    assert personal.versions_to_keep([1, 3], current=7, window=2) == {3}  # the newest older one stays
    assert personal.versions_to_keep([6], current=7, window=1) == {6}


def test_a_replayed_round_reads_the_state_from_before_it_and_replaces_its_own(tmp_path):
    def context() -> Context:  # a restarted node: nothing in memory
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def record(value: float) -> ArrayRecord:
        return ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})

    shapes = {"w": (3,)}
    for server_round in (1, 2, 3):  # round 3 trained, then the server was killed before its checkpoint
        personal.persist(context(), tmp_path, record(server_round), "lora", server_round, window=1)
    replay = personal.restore(context(), tmp_path, "lora", shapes, before_round=3)
    assert replay.record["w"].numpy()[0] == 2.0  # round 2's state, not the killed round 3's
    personal.persist(context(), tmp_path, record(30.0), "lora", 3, window=1)
    assert sorted(personal.versions(tmp_path)) == [2, 3]  # round 1 pruned; round 3 replaced
    assert personal.restore(context(), tmp_path, "lora", shapes).record["w"].numpy()[0] == 30.0


def test_a_kill_between_the_checkpoint_folder_renames_resumes_from_the_previous_checkpoint(
    tmp_path, checkpointed
):
    run_dir = shutil.copytree(checkpointed, tmp_path / "run")
    latest = run_dir / "checkpoints" / "latest"
    latest.rename(latest.with_name(".latest.old"))  # killed after the first rename of the swap
    config, users = cli.resumed_config(run_dir, [])
    assert load_checkpoint(run_dir).server_round == 2 and users == 2 and config["resume"]


def test_an_unreadable_old_version_is_left_out_and_never_hides_the_latest_state(tmp_path):
    def context() -> Context:
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    for server_round in (1, 2):
        record = ArrayRecord({"w": Array(np.full(3, server_round, dtype=np.float32))})
        personal.persist(context(), tmp_path, record, "lora", server_round, window=1)
    (tmp_path / "personal.round-1.safetensors").write_bytes(b"not a safetensors file")
    assert sorted(personal.versions(tmp_path)) == [2]
    restored = personal.restore(context(), tmp_path, "lora", {"w": (3,)}, before_round=3)
    assert restored.source == "file" and restored.record["w"].numpy()[0] == 2.0
    assert personal.restore(context(), tmp_path, "lora", {"w": (3,)}, before_round=2).source == "fresh"


def test_the_serverapp_itself_refuses_a_resume_that_changes_the_experiment(tmp_path, checkpointed):
    """The ServerApp checks again (a run config can reach it without the launcher: `flwr run`)."""
    from flhf_core.runs.inprocess import InProcessGrid
    from flhf_core.server.main import run_federation

    run_dir = shutil.copytree(checkpointed, tmp_path / "run")
    before = snapshot(run_dir)
    saved = load_checkpoint(run_dir).config
    mapping = {**saved, "seed": 7, "resume": True, "results-dir": str(tmp_path), "run-name": "run"}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=mapping)
    with pytest.raises(CheckpointError, match="seed: 42 in the checkpoint, 7 now"):
        run_federation(InProcessGrid(mapping, 2), context)
    assert snapshot(run_dir) == before


def test_a_resumed_run_on_other_data_keeps_the_tokenizer_it_trained(
    flower_identity, smoke_config, tmp_path, in_process_grid
):
    """Training a tokenizer is not deterministic: a resume must use the run's own, as its
    checkpoint kept it, or the weights would read another vocabulary."""
    from flwr.app import Context, RecordDict

    from flhf_core.learning.model import tokenizer_fingerprint, wrap_tokenizer
    from flhf_core.server.main import run_federation

    rows = [
        {
            "id": f"d{i}",
            "document": f"we study topic {i % 7} with method {i % 5} and data {i}",
            "summary": f"topic {i % 7}",
        }
        for i in range(80)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = smoke_config.replace(
        **{
            "dataset": str(tmp_path / "d.jsonl"),
            "results-dir": str(tmp_path),
            "run-name": "r",
            "num-server-rounds": 1,
        }
    )

    def run(config):
        context = Context(
            run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config.to_mapping()
        )
        return run_federation(in_process_grid(config.to_mapping(), users=2), context)

    run_dir = run(config)
    first = tokenizer_fingerprint(
        wrap_tokenizer((run_dir / "checkpoints" / "latest" / "tokenizer.json").read_bytes())
    )
    run(config.replace(**{"num-server-rounds": 2, "resume": True}))
    second = tokenizer_fingerprint(
        wrap_tokenizer((run_dir / "checkpoints" / "latest" / "tokenizer.json").read_bytes())
    )
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2 and second == first


def resume_in_process(run_dir: Path, tmp_path: Path, **changes) -> None:
    from flhf_core.runs.inprocess import InProcessGrid
    from flhf_core.server.main import run_federation

    saved = load_checkpoint(run_dir).config
    mapping = {**saved, "resume": True, "results-dir": str(tmp_path), "run-name": run_dir.name, **changes}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=mapping)
    run_federation(InProcessGrid(mapping, 2), context)


def test_a_run_saved_before_the_official_split_resumes_only_under_the_split_it_had(tmp_path, checkpointed):
    """A checkpoint whose config has no ``heldout-split`` held its documents out by hash: resumed
    under today's default (the official split) it would train on papers it reported on, so it is
    refused, naming the key and what the run had."""
    run_dir = shutil.copytree(checkpointed, tmp_path / "run")
    state_file = run_dir / "checkpoints" / "latest" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["heldout-split"]
    state_file.write_text(json.dumps(state))
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="heldout-split: 'hash' in the checkpoint, 'official' now"):
        resume_in_process(run_dir, tmp_path, **{"num-server-rounds": 3})
    check_resumable(state["config"], {**state["config"], "heldout-split": "hash"})  # what it had
    assert snapshot(run_dir) == before


def test_weights_are_never_resumed_under_another_tokenizer(tmp_path, checkpointed):
    """Two tokenizers of one size load the same weights silently: the checkpoint keeps its
    tokenizer's hash, and a resume under another is refused before anything is written."""
    run_dir = shutil.copytree(checkpointed, tmp_path / "run")
    state_file = run_dir / "checkpoints" / "latest" / "state.json"
    state = json.loads(state_file.read_text())
    assert len(state["tokenizer-sha256"]) == 64
    state["tokenizer-sha256"] = "0" * 64  # as if the shipped tokenizer had been rebuilt since
    state_file.write_text(json.dumps(state))
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="tokenizer 000000000000"):
        resume_in_process(run_dir, tmp_path, **{"num-server-rounds": 3})
    assert snapshot(run_dir) == before
