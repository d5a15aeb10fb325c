"""The package's layout in figures: modules per folder, import circles, the longest import chain,
and the modules one train message passes through.

    python bench/layout.py            # prints the figures, writes bench/results/layout.json
    python bench/layout.py --no-trace # the import graph only (no model, a second)

Every import statement counts, function-level ones included (:mod:`import_graph`, which the
layout test reads too). The train message is a real one (the smoke preset's tiny model, a
supervised round) handed to ``client_app.train``; every call into a function of ``flhf_core``
is recorded in order, consecutive calls within one module are folded into one visit, and a
*return* is a distinct step ``A -> B`` back into a module B the message had already left.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_DIR, write_result
from import_graph import PACKAGE, cycles, import_graph, longest_chain


def folder_counts(graph: dict[str, set[str]]) -> dict[str, int]:
    """Modules (packages' ``__init__`` excluded) per folder of the package."""
    packages = {module.rsplit(".", 1)[0] for module in graph if "." in module}
    counts: Counter[str] = Counter()
    for module in graph:
        if module not in packages:
            counts[module.rsplit(".", 1)[0]] += 1
    return dict(sorted(counts.items()))


def train_message_trace() -> list[str]:
    """The ``flhf_core`` modules a supervised train message calls into, in order (folded)."""
    import torch
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client_app
    from flhf_core.config import PYPROJECT, RunConfig, load_preset
    from flhf_core.learning.model import (
        build_model,
        parameters_to_record,
        shipped_tokenizer,
        tokenizer_fingerprint,
    )

    torch.set_num_threads(1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    config = RunConfig.from_mapping(
        {
            **load_preset(PYPROJECT.parent / "configs" / "smoke.toml"),
            "eval-max-examples": 2,
            "local-epochs": 1,
        }
    )
    tokenizer = shipped_tokenizer()
    model = build_model(config, tokenizer)
    content = RecordDict(
        {
            "arrays": parameters_to_record(model),
            "config": ConfigRecord(
                {"phase": "sft", "server-round": 1, "tokenizer-sha256": tokenizer_fingerprint(tokenizer)}
            ),
        }
    )
    message = Message(content=content, dst_node_id=101, message_type=MessageType.TRAIN)
    context = Context(
        run_id=1,
        node_id=101,
        node_config={"partition-id": 1, "num-partitions": 3},
        state=RecordDict(),
        run_config=config.to_mapping(),
    )
    visits: list[str] = []

    def profile(frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            if module.startswith(f"{PACKAGE}.") and (not visits or visits[-1] != module):
                visits.append(module)

    sys.setprofile(profile)
    try:
        client_app.train(message, context)
    finally:
        sys.setprofile(None)
    return visits


def trace_figures(visits: list[str]) -> dict:
    """Modules visited, and the distinct steps back into a module the message had left
    (``A -> B`` where B was visited before A; a loop repeating a step counts it once)."""
    seen: set[str] = set()
    returns: set[tuple[str, str]] = set()
    for previous, module in zip(["", *visits], visits, strict=False):
        if module in seen:
            returns.add((previous, module))
        seen.add(module)
    by_module = Counter(module for _, module in returns)
    return {
        "train-message-modules": len(seen),
        "train-message-returns": len(returns),
        "train-message-returns-by-module": dict(by_module.most_common()),
        "train-message-visits": visits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-trace", action="store_true", help="skip the train message (no model)")
    args = parser.parse_args()
    graph = import_graph(PROJECT_DIR / PACKAGE)
    chain = longest_chain(graph)
    figures = {
        "modules": sum(folder_counts(graph).values()),
        "modules-per-folder": folder_counts(graph),
        "imports": sum(len(targets) for targets in graph.values()),
        "circles": [sorted(c) for c in cycles(graph)],
        "longest-chain-length": len(chain),
        "longest-chain": chain,
    }
    if not args.no_trace:
        figures.update(trace_figures(train_message_trace()))
    print(f"modules: {figures['modules']} in {len(figures['modules-per-folder'])} folders")
    for folder, count in figures["modules-per-folder"].items():
        print(f"  {folder:<28} {count}")
    print(f"module-to-module imports: {figures['imports']}")
    print(f"import circles: {len(figures['circles'])} {figures['circles']}")
    print(f"longest import chain: {len(chain)} modules: {' -> '.join(chain)}")
    if not args.no_trace:
        print(
            f"a train message passes through {figures['train-message-modules']} modules and returns to "
            f"modules it had left {figures['train-message-returns']} times "
            f"{figures['train-message-returns-by-module']}"
        )
    write_result("layout", figures)


if __name__ == "__main__":
    main()
