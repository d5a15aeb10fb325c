"""What the tests of whole runs share: starting ``flhf`` as a user would, finding the processes a
run left, and checking what a finished smoke or feedback-smoke run holds."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
from pathlib import Path

from flhf_core.results.tracking import read_metrics
from flhf_core.runs import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flhf_background(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flhf_core.runs.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def summarize(*args: str) -> tuple[int, str, str]:
    """``flhf summarize ...`` in this process (its imports are already paid for here)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["summarize", *args])
    return code, out.getvalue(), err.getvalue()


def flhf(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flhf_core.runs.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if text in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def check_smoke_run(run_dir: Path, stdout: str, tmp_path: Path) -> None:
    """What a finished run of the smoke preset holds (its results-dir is ``run_dir``'s parent)."""
    assert str(run_dir) in stdout  # the run prints where it writes

    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "splits.json",
        "model/model.safetensors",
        "model/config.json",
        "checkpoints/latest/model.safetensors",
        "plots/rougeL.png",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "config.json").read_text())["results-dir"] == str(run_dir.parent)

    rows = read_metrics(run_dir / "metrics.jsonl")
    server = [r for r in rows if r["scope"] == "server"]
    assert [r["round"] for r in server] == [0, 1, 2]
    assert server[-1]["loss"] < server[0]["loss"]  # held-out loss fell
    clients = [r for r in rows if r["scope"] == "client"]
    assert {r["client"] for r in clients} == {0, 1}
    # every user learns: its first round's last epoch beats its first batch, and its last round
    # ends below where its first began (one batch against an epoch's mean is too noisy per round)
    for user in (0, 1):
        rounds = sorted((r for r in clients if r["client"] == user), key=lambda r: r["round"])
        assert rounds[0]["train-loss-last"] < rounds[0]["train-loss-first"]
        assert rounds[-1]["train-loss-last"] < rounds[0]["train-loss-first"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["failures"] == 0
    assert summary["rougeL"] > summary["rougeL-round0"]
    # one message per user per round (2 rounds, 2 users), and the final model's evaluation
    assert summary["bytes-up"] > 0 and summary["bytes-down"] == 1.5 * summary["bytes-up"]

    text = tmp_path / "paper.txt"
    text.write_text(
        "We propose a parser for long sentences. It improves accuracy by 2 points on two treebanks."
    )
    code, out, err = summarize(str(run_dir), str(text), "--aspect", "outcome")
    assert code == 0 and out.strip(), err  # the global model wrote a summary
    code, _, err = summarize(str(run_dir), str(text), "--user", "0")
    assert code == 2 and "no personal state" in err


def check_feedback_run(run_dir: Path, tmp_path: Path) -> None:
    rows = read_metrics(run_dir / "metrics.jsonl")
    server = {r["round"]: r for r in rows if r["scope"] == "server"}
    assert [server[k]["phase"] for k in (0, 1, 2)] == ["init", "sft", "feedback"]
    for key in ("reward", "reward-worst", "reward-std", "win-rate", "kl-to-previous", "client-repetition"):
        assert key in server[2], key
    assert server[2]["reward-worst"] <= server[2]["reward"] <= 1.0
    feedback_users = [r for r in rows if r["scope"] == "client" and r["round"] == 2]
    assert {r["client"] for r in feedback_users} == {0, 1}
    for row in feedback_users:
        assert row["aggregation-weight"] <= 0.6 + 1e-9
        for key in (
            "train-reward",
            "train-reward-before",
            "train-reward-content",
            "train-reward-length",
            "train-sample-score",
            "train-kl",
            "reward",
            "win-rate",
        ):
            assert key in row, key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "reward-after-sft" in summary and "reward-gain-from-feedback" in summary
    assert "personalization-gain" in summary and "reward-personal-worst" in summary

    # a user puts its personalized model to work
    text = tmp_path / "paper.txt"
    text.write_text(
        "We propose a parser for long sentences. It improves accuracy by 2 points on two treebanks."
    )
    for user in ("0", "1"):
        code, out, err = summarize(str(run_dir), str(text), "--user", user)
        assert code == 0 and out.strip(), err
