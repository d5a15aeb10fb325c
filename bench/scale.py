"""The sampled users, not the total, set a round's cost: 10 users against 1000, 10 sampled.

    python bench/scale.py [PRESET] [--many 1000] [--sampled 10] [--rounds 3] [key=value ...]

Runs the preset (default: smoke) with ``flhf run`` twice, one after the other: ``--sampled``
users all trained every round, then ``--many`` users of which ``--sampled`` are sampled per
round (``fraction-train`` and ``fraction-evaluate`` set so). Each user holds the same amount
of data in both runs (``--documents-per-user``): the corpus is the aclsum documents repeated
(under new ids) to ``users x documents-per-user`` documents, so that only the number of users
differs; with the 250 aclsum documents as they are, 1000 users would hold almost nothing.
Both runs load the same model and tokenizer (tiny-t5 ``xs`` saved as a checkpoint folder). Prints and writes
(``bench/results/scale.json``) the mean seconds per round (server rows; round 1 included and
excluded) and the peak resident memory of the whole process tree (SuperLink, simulation
engine, ServerApp, workers), with the ratios. Target: at most 1.2x on both.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import PROJECT_DIR, mean, server_rows, write_result

from flhf_core.data.corpus import load_corpus
from flhf_core.results.tracking import read_metrics


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(proc.name))
            rss[int(proc.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def scaled_corpus(documents: int, path: Path) -> Path:
    """The aclsum documents, repeated under new ids up to ``documents`` documents, as JSONL."""
    import json

    from flhf_core.config import RunConfig

    corpus = load_corpus(RunConfig())
    with path.open("w") as f:
        for i in range(documents):
            doc = corpus.documents[i % len(corpus.documents)]
            row = {
                "id": f"{doc.doc_id}#{i // len(corpus.documents)}",
                "document": doc.text,
                **dict(doc.summaries),
            }
            f.write(json.dumps(row) + "\n")
    return path


def saved_model(size: str, folder: Path) -> Path:
    """A tiny-t5 with the shipped aclsum tokenizer, saved as a checkpoint folder: both runs load
    the same model and tokenizer (a corpus of another size would otherwise train another one)."""
    from flhf_core.config import RunConfig
    from flhf_core.learning.model import build_model, shipped_tokenizer

    tokenizer = shipped_tokenizer()
    build_model(RunConfig(tiny_t5_size=size), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measured_run(
    items: list[str], users: int, fraction: float, results: Path, name: str, per_user: int, model: Path
) -> dict:
    corpus = scaled_corpus(users * per_user, results / f"corpus-{users}.jsonl")
    command = [sys.executable, "-m", "flhf_core.runs.cli", "run", *items, "--quiet", f"--users={users}"]
    command += [f"dataset={corpus}", "summary-fields=challenge,approach,outcome", f"model={model}"]
    command += [f"fraction-train={fraction}", f"fraction-evaluate={fraction}", f"min-available-nodes={users}"]
    command += [f"results-dir={results}", f"run-name={name}"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=PROJECT_DIR)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if process.wait() != 0:
        raise SystemExit(f"flhf run failed for {users} users")
    done.set()
    sampler.join()
    rows = server_rows(read_metrics(results / name / "metrics.jsonl"))
    seconds = [r["seconds"] for r in rows]
    columns = ("client-train-seconds", "client-eval-seconds", "setup-seconds", "server-eval-seconds")
    return {
        "users": users,
        "sampled": [r["clients"] for r in rows],
        **{f"mean-{c}": mean([r.get(c, 0.0) for r in rows]) for c in columns},
        "round-seconds": seconds,
        "mean-round-seconds": mean(seconds),
        "mean-round-seconds-after-first": mean(seconds[1:]),
        "peak-rss-bytes": peak,
        "wall-seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[PRESET] [key=value ...]")
    parser.add_argument("--many", type=int, default=1000)
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--documents-per-user", type=int, default=10)
    args = parser.parse_args()
    items = (args.items or ["smoke"]) + [f"num-server-rounds={args.rounds}"]
    with tempfile.TemporaryDirectory(prefix="flhf-scale-") as folder:
        per_user = args.documents_per_user
        model = saved_model("xs", Path(folder) / "model")
        few = measured_run(items, args.sampled, 1.0, Path(folder), "few", per_user, model)
        many = measured_run(items, args.many, args.sampled / args.many, Path(folder), "many", per_user, model)
    ratios = {
        "time-ratio": many["mean-round-seconds-after-first"] / few["mean-round-seconds-after-first"],
        "time-ratio-all-rounds": many["mean-round-seconds"] / few["mean-round-seconds"],
        "memory-ratio": many["peak-rss-bytes"] / few["peak-rss-bytes"],
    }
    print(f"\n{args.sampled} users sampled per round, {args.rounds} rounds ({' '.join(items)})")
    for r in (few, many):
        print(
            f"  {r['users']:5} users: {r['mean-round-seconds-after-first']:.2f} s per round after the first "
            f"({r['mean-round-seconds']:.2f} s with it), peak memory {r['peak-rss-bytes'] / 2**30:.2f} GiB, "
            f"wall {r['wall-seconds']:.0f} s\n        per round, summed over users: local updates {r['mean-client-train-seconds']:.2f} s, "
            f"evaluation {r['mean-client-eval-seconds']:.2f} s, setup {r['mean-setup-seconds']:.2f} s; "
            f"server evaluation {r['mean-server-eval-seconds']:.2f} s"
        )
    print(
        f"  ratio {args.many}/{args.sampled}: time {ratios['time-ratio']:.2f}x "
        f"(all rounds {ratios['time-ratio-all-rounds']:.2f}x), memory {ratios['memory-ratio']:.2f}x (target <= 1.2x)"
    )
    write_result("scale", {"few": few, "many": many, **ratios})


if __name__ == "__main__":
    main()
