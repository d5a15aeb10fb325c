"""Whole federations, in process, on the hub presets' model families: a supervised round and a
feedback round with personal LoRA adapters, on tiny stand-ins for flan-t5 and BART
(``tests/hub_checkpoints.py``) named by ``model`` as a local folder, the way a hub name is loaded."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import SHORT_TEXTS
from safetensors.numpy import load_file

from flhf_core.config import RunConfig
from flhf_core.learning.model import load_pretrained
from flhf_core.results.tracking import read_metrics
from flhf_core.runs import cli
from flhf_core.runs.inprocess import run_in_process

# a feedback round of one step of 2 documents x 2 samples, few tokens, few evaluated examples
FAST = [*SHORT_TEXTS, "max-new-tokens=8", "eval-max-examples=2", "heldout-max-examples=4"]
FAST += ["feedback-steps=1", "feedback-prompts=2", "samples-per-prompt=2"]
ADAPTED = {"flan-t5": ".SelfAttention.q.lora_A.", "bart": ".self_attn.q_proj.lora_A."}
ARCHITECTURE = {"flan-t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}


@pytest.mark.parametrize("family", ["flan-t5", "bart"])
def test_a_feedback_federation_runs_on_a_hub_checkpoint(hub_checkpoint, tmp_path, family):
    """User 0 loads the run's ``model``; user 1, as a node without hub access would, its own copy
    of it (``model-path``): the server's tokenizer hash fits both."""
    folder = hub_checkpoint(family)
    copy = shutil.copytree(folder, tmp_path / "copy")
    items = [*FAST, f"model={folder}", "personalization=lora", "lora-rank=4"]
    items += [f"results-dir={tmp_path}", "run-name=hub"]
    nodes = {0: {"torch-threads": 1}, 1: {"torch-threads": 1, "model-path": str(copy)}}
    run_dir = run_in_process(RunConfig.from_mapping(cli.merged_config("feedback-smoke", items)), 2, nodes)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failures"] == 0
    rows = read_metrics(run_dir / "metrics.jsonl")
    server = [r for r in rows if r["scope"] == "server"]
    assert [r["phase"] for r in server] == ["init", "sft", "feedback"]
    for row in server:
        assert all(math.isfinite(row[k]) for k in ("loss", "rougeL") if k in row), row
    trained = [r for r in rows if r["scope"] == "client" and "train-loss" in r]
    assert {r["client"] for r in trained} == {0, 1} and all(math.isfinite(r["train-loss"]) for r in trained)
    assert all(math.isfinite(summary[k]) for k in ("loss", "rougeL", "reward"))
    assert type(load_pretrained(run_dir / "model")).__name__ == ARCHITECTURE[family]
    for user in (0, 1):  # each user's adapter sits on its family's own linear layers
        state = load_file(str(run_dir / "users" / f"user-{user}" / "personal.safetensors"))
        assert any(ADAPTED[family] in name for name in state)
