"""A fault campaign on the loopback deployment: does every run complete, every valid reply
count, and no fault escape screening?

    python bench/faults.py                       # a fault-free run, then 3 seeded runs with faults
    python bench/faults.py --runs 5 --users 5    # more of both

Each run is a real deployment on 127.0.0.1 (a SuperLink, one SuperNode per user, a ClientApp
process per message; the ``xs`` model, a few rounds). The fault-free run measures a round;
``round-timeout`` is then set to twice its slowest round. In each faulty run, with the run's
seed choosing the moments and victims:

* one user is a rogue (``flhf_core/client/faults.py``, switched on for its SuperNode only by
  ``FLHF_FAULT_INJECTION=1``): each round it forges its reply in another way (arrays whose bytes
  differ from what they declare, NaN, float64, oversized, garbage bytes, another user's
  identity) or answers past the round timeout;
* an honest user's SuperNode is SIGKILLed while it trains, and started again a few seconds later;
* another honest user's ClientApp process is SIGKILLed while it trains.

The runs are kept in ``--dir`` (``results/faults``); ``--report`` recomputes the figures from
them without running anything. Prints and writes ``bench/results/faults.json``: faults injected by kind, rounds completed,
rejections by reason code, runs that ended badly, and whether each run's final model and every
completed round's rows are intact. A rogue fault *escapes* when its round records no rejection
with the code that fault must get.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import write_result

from flhf_core.client import faults
from flhf_core.common import atomic_write_json, read_json
from flhf_core.learning.model import load_pretrained
from flhf_core.results.rounds import REJECTION_CODES
from flhf_core.results.tracking import read_metrics
from flhf_core.runs import watchdog
from flhf_core.runs.cli import merged_config
from flhf_core.runs.deploy import CONNECTION, Loopback, training_marker
from flhf_core.runs.launcher import submit_and_follow

SHORT = ["tiny-t5-size=xs", "max-source-tokens=48", "max-target-tokens=16", "max-new-tokens=12"]
SHORT += ["eval-max-examples=4", "heldout-max-examples=8", "reward-documents=4", "local-epochs=1"]


def config_for(results: Path, name: str, rounds: int, seed: int, timeout: float) -> dict:
    items = [*SHORT, f"num-server-rounds={rounds}", f"seed={seed}", "min-available-nodes=2"]
    items += [f"round-timeout={timeout}", f"results-dir={results}", f"run-name={name}", "tracking=none"]
    return merged_config("smoke", items)


def clientapp_pids(supernode_port: str) -> list[int]:
    """The ClientApp processes a SuperNode started (their command line names its API port)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "flwr-clientapp" in argv and f":{supernode_port}" in argv:
            pids.append(int(proc.name))
    return pids


def inject(
    federation: Loopback, rng: np.random.Generator, rounds: int, done: threading.Event, log: list
) -> None:
    """Kill an honest SuperNode (then start it again) and an honest ClientApp, each while it
    trains, in rounds the seed picks."""
    honest = np.arange(federation.users - 1)  # the last user is the rogue
    node_victim, app_victim = (int(u) for u in rng.choice(honest, 2, replace=False))
    node_round, app_round = (int(r) for r in rng.integers(2, rounds + 1, size=2))
    plan = sorted(
        [(node_round, "supernode-sigkill", node_victim), (app_round, "clientapp-sigkill", app_victim)]
    )
    for server_round, kind, user in plan:
        marker = training_marker(federation.workdir, user)
        while not done.is_set():
            if marker.is_file() and marker.read_text().strip() == str(server_round):
                break
            time.sleep(0.2)
        if done.is_set():
            return
        time.sleep(float(rng.uniform(0.0, 1.5)))  # a moment inside local training
        if kind == "supernode-sigkill":
            process = federation.processes[f"supernode-{user}"]
            os.kill(process.pid, signal.SIGKILL)
            log.append({"round": server_round, "kind": kind, "user": user})
            time.sleep(5.0)
            federation.start_supernode(user)
        else:
            port = federation.processes[f"supernode-{user}"].args[-1]  # the running SuperNode's own port
            pids = clientapp_pids(port)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            log.append({"round": server_round, "kind": kind, "user": user, "killed": len(pids)})


def run_once(
    workdir: Path, config: dict, users: int, seed: int | None, timeout: float
) -> tuple[float, list[dict], list[dict]]:
    """One loopback run (with faults when ``seed`` is given): its wall time, the faults injected
    by the campaign, and those the rogue logged."""
    rogue = users - 1
    node_config, node_env = {}, {}
    if seed is not None:
        node_config[rogue] = f'rogue="cycle" rogue-offset={seed * 3} rogue-delay={timeout + 10}'
        node_env[rogue] = {faults.ENABLE: "1"}
    state = workdir / "user-state"
    injected: list[dict] = []
    done = threading.Event()
    with Loopback(workdir, users, state_dir=state, node_config=node_config, node_env=node_env) as federation:
        if seed is not None:
            rounds = int(config["num-server-rounds"])
            args = (federation, np.random.default_rng(seed), rounds, done, injected)
            threading.Thread(target=inject, args=args, daemon=True).start()
        started = time.perf_counter()
        submit_and_follow(config, [CONNECTION], False, federation.env(), federation.alive)
        seconds = time.perf_counter() - started
        done.set()
    log = state / "faults.jsonl"
    rogue_faults = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return seconds, injected, rogue_faults


def examine(run_dir: Path, rogue_faults: list[dict]) -> dict:
    """What a run left: completed?, rounds, rejections by code, escaped faults, intact rows and model."""
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    server = {r["round"]: r for r in rows if r["scope"] == "server"}
    failed = [r for r in rows if r.get("failed")]
    users = [r for r in rows if r["scope"] == "client" and not r.get("failed")]

    def rejection(fault: dict) -> str | None:
        """The code the rogue's reply of that round was rejected with (a stolen identity names
        the victim's user in its row), or None: it escaped."""
        codes = [
            r.get("code") for r in failed if r["round"] == fault["round"] and r.get("node-id") is not None
        ]
        rogue_rows = [
            r.get("code") for r in failed if r["round"] == fault["round"] and r["client"] == fault["user"]
        ]
        if fault["kind"] == "steal":
            return "identity" if "identity" in codes else None
        return rogue_rows[0] if rogue_rows else None

    handled = [{**f, "rejected-as": rejection(f)} for f in rogue_faults]
    rounds = int(summary.get("rounds", 0))
    rows_intact = sorted(server) == list(range(rounds + 1)) and all(
        # every valid reply recorded; every missing one has a row with a code (evaluations add rows)
        server[k]["clients"] == sum(1 for r in users if r["round"] == k and "train-loss" in r)
        and server[k]["failures"] <= sum(1 for r in failed if r["round"] == k and r.get("code"))
        for k in range(1, rounds + 1)
    )
    try:
        model = load_pretrained(run_dir / "model")
        model_intact = all(bool(p.isfinite().all()) for p in model.parameters())
    except Exception:
        model_intact = False
    return {
        "status": summary.get("status", "no summary"),
        "rounds": rounds,
        "rejected": {code: int(summary.get(f"rejected-{code}", 0)) for code in REJECTION_CODES},
        "rogue-faults": handled,
        "escaped": [f for f in handled if f["rejected-as"] is None],
        "rejected-as-expected": sum(f["rejected-as"] == faults.REJECTED_AS[f["kind"]] for f in handled),
        "rows-intact": rows_intact,
        "model-intact": model_intact,
    }


def report(root: Path, campaign: dict) -> dict:
    """The campaign's figures from its kept runs (``root``) and what it injected (``campaign``)."""
    runs = []
    for meta in campaign["runs"]:
        log = root / f"rogue-{meta['seed']}.jsonl"
        rogue = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        found = {
            **meta,
            "injected": meta["injected"] + rogue,
            **examine(root / f"faults-{meta['seed']}", rogue),
        }
        runs.append(found)
        print(
            f"seed {found['seed']}: {found['status']}, {found['rounds']} rounds, rejected "
            f"{ {k: v for k, v in found['rejected'].items() if v} }, escaped {len(found['escaped'])}, "
            f"rows {'intact' if found['rows-intact'] else 'BROKEN'}, model {'intact' if found['model-intact'] else 'BROKEN'}",
            flush=True,
        )
    kinds = Counter(f["kind"] for run in runs for f in run["injected"])
    return {
        **{k: v for k, v in campaign.items() if k != "runs"},
        "faults-injected": dict(sorted(kinds.items())),
        "rounds-completed": sum(r["rounds"] for r in runs),
        "rejected": {code: sum(r["rejected"][code] for r in runs) for code in REJECTION_CODES},
        "runs-ended-badly": sum(r["status"] != "completed" for r in runs),
        "rogue-faults": sum(len(r["rogue-faults"]) for r in runs),
        "rogue-faults-rejected-as-expected": sum(r["rejected-as-expected"] for r in runs),
        "faults-escaped": sum(len(r["escaped"]) for r in runs),
        "all-intact": all(r["rows-intact"] and r["model-intact"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs with faults (seeds 0..runs-1)")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="results/faults", help="where the runs are kept (for --report)")
    parser.add_argument("--report", action="store_true", help="run nothing: the figures of the kept runs")
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    if not args.report:
        root.mkdir(parents=True, exist_ok=True)
        watchdog.start()  # however this campaign ends, no SuperLink or SuperNode of it runs on
        clean = config_for(root, "fault-free", args.rounds, 100, 0)
        seconds, _, _ = run_once(root / "fault-free.deployment", clean, args.users, None, 0)
        rows = read_metrics(root / "fault-free" / "metrics.jsonl")
        round_seconds = max(r["seconds"] for r in rows if r["round"] > 0 and r["scope"] == "server")
        timeout = round(2 * round_seconds, 1)
        print(
            f"fault-free: {seconds:.0f} s, slowest round {round_seconds:.1f} s: round-timeout {timeout} s",
            flush=True,
        )
        campaign = {"users": args.users, "rounds": args.rounds, "round-timeout": timeout}
        campaign |= {"fault-free-round-seconds": round_seconds, "runs": []}
        for seed in range(args.runs):
            name = f"faults-{seed}"
            config = config_for(root, name, args.rounds, seed, timeout)
            seconds, injected, _ = run_once(root / f"{name}.deployment", config, args.users, seed, timeout)
            shutil.copyfile(
                root / f"{name}.deployment" / "user-state" / "faults.jsonl", root / f"rogue-{seed}.jsonl"
            )
            campaign["runs"].append({"seed": seed, "seconds": seconds, "injected": injected})
            atomic_write_json(root / "campaign.json", campaign)
    figures = report(root, read_json(root / "campaign.json"))
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}, indent=1))
    write_result("faults", figures)


if __name__ == "__main__":
    main()
