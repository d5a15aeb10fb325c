"""What every benchmark shares: running ``flhf`` and timing it, the machine's description, and
writing figures to ``bench/results/<name>.json`` (atomically, with the machine and commit)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flhf_core.common import atomic_write_json
from flhf_core.results.tracking import read_metrics

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def commit(cwd: Path = PROJECT_DIR) -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
    )
    return result.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_result(name: str, figures: dict[str, Any]) -> Path:
    path = RESULTS_DIR / f"{name}.json"
    atomic_write_json(
        path,
        {
            "benchmark": name,
            "commit": commit(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine(),
            **figures,
        },
    )
    print(f"\nwrote {path}")
    return path


def run_flhf(
    mode: str, items: list[str], results: Path, name: str, extra: list[str] = (), cwd: Path = PROJECT_DIR
) -> tuple[float, list[dict]]:
    """``flhf MODE ITEMS`` (run or loopback) into ``results/name``: the command's wall time and the
    run's metrics rows. ``cwd`` picks the checkout whose code runs (another commit's worktree)."""
    command = [sys.executable, "-m", "flhf_core.runs.cli", mode, *items, "--quiet", *extra]
    command += [f"results-dir={results}", f"run-name={name}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd)})
    return time.perf_counter() - started, read_metrics(results / name / "metrics.jsonl")


def server_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["scope"] == "server" and r["round"] > 0]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
