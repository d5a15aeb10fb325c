"""A federation in one process, without Flower's engines: for tests, debugging and device checks.

The real ServerApp loop (:func:`flhf_core.server.main.run_federation`) talks to the real ClientApp
handlers (``client_app``) through :class:`InProcessGrid`, which hands messages over in
memory instead of through a SuperLink. It writes the same results folder as a Flower run, in
seconds rather than the engines' start-up time, which is what a quick check of every
algorithm on a GPU needs:

    python -m flhf_core.runs.inprocess feedback-smoke device=cuda feedback-algorithm=ppo --users 2

It is not a replacement for ``flhf run``: no Ray workers, no separate processes, users run
one after the other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Error, Message, MessageType, RecordDict

import client_app
from flhf_core.config import ConfigError, RunConfig

Tamper = Callable[[Message, Message], Message]
HANDLERS = {
    MessageType.TRAIN: client_app.train,
    MessageType.EVALUATE: client_app.evaluate,
    MessageType.QUERY: client_app.query,
}


class InProcessGrid:
    """Flower's Grid, minus the network: messages go to the real ClientApp handlers in this
    process, each node with its own Context (partition-id, num-partitions, state).

    ``node_configs[user]`` adds node-config keys (a ``data-file``, a ``state-dir``) to that
    user's node. ``tamper(sent, reply)`` may replace a reply (a misbehaving client, in tests); a handler
    that raises answers with an error reply, as Flower's ClientApp runtime does.
    """

    def __init__(
        self,
        run_config: dict,
        users: int,
        tamper: Tamper | None = None,
        first_node_id: int = 1000,
        node_configs: Mapping[int, Mapping] | None = None,
    ) -> None:
        self.tamper = tamper
        node_configs = node_configs or {}
        self.contexts = {
            first_node_id + 7 * user: Context(
                run_id=1,
                node_id=first_node_id + 7 * user,
                node_config={"partition-id": user, "num-partitions": users, **node_configs.get(user, {})},
                state=RecordDict(),
                run_config=run_config,
            )
            for user in range(users)
        }
        self.delivered: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what the SuperLink does
            self.delivered.append(message)
            try:
                handler = HANDLERS[message.metadata.message_type]
                reply = handler(message, self.contexts[message.metadata.dst_node_id])
            except Exception as error:
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            replies.append(reply if self.tamper is None else self.tamper(message, reply))
        return replies


def run_in_process(config: RunConfig, users: int, node_configs: Mapping[int, Mapping] | None = None) -> Path:
    """Run the federation ``config`` describes with ``users`` in-process users; its run folder.

    ``node_configs[user]``: extra node-config keys of that user's node (``torch-threads``...)."""
    from flwr.supercore.task_identity import TaskIdentity

    from flhf_core.server.main import run_federation

    # Flower builds messages only where it knows the run and node (the ServerApp's process)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    mapping = config.to_mapping()
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=mapping)
    return run_federation(InProcessGrid(mapping, users, node_configs=node_configs), context)


def main(argv: list[str] | None = None) -> int:
    from flhf_core.runs.cli import merged_config, split_items

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[PRESET] [key=value ...]")
    parser.add_argument("--users", type=int, help="users (default: the preset's min-available-nodes)")
    args = parser.parse_args(argv)
    try:
        config = RunConfig.from_mapping(merged_config(*split_items(args.items)))
    except ConfigError as error:
        print(f"flhf: error: {error}", file=sys.stderr)
        return 2
    run_dir = run_in_process(config, args.users or max(config.min_available_nodes, 2))
    print(f"flhf: in-process run written to {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
