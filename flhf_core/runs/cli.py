"""The ``flhf`` command: run a preset with overrides, resume, compare, summarize, build the tokenizer.

``flhf run [PRESET] [key=value ...]`` exists because ``flwr run`` refuses a
preset file together with ``key=value`` overrides, and answers an unknown key
with a bare "Invalid run configuration". It merges pyproject's defaults, the
preset and the overrides; validates them with :class:`RunConfig` (an error
names the key and what is allowed); resolves ``results-dir`` to an absolute
path; and launches the run (:mod:`flhf_core.runs.launcher`), which exits with the
run's real status.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data.corpus import load_corpus
from flhf_core.results.tracking import claim_run_dir
from flhf_core.runs import watchdog
from flhf_core.runs.deploy import CONNECTION, Loopback
from flhf_core.runs.launcher import launch_simulation, report, submit_and_follow
from flhf_core.runs.presets import (  # noqa: F401 (merged_config, parse_override: part of the command's API)
    merged_config,
    parse_override,
    resumed_config,
    split_items,
)


def keep_earlier_logs(*folders: Path) -> None:
    """Before a resume writes its logs, rename the earlier attempt's (``flower.log`` ->
    ``flower.attempt-1.log``, ...): the record of how the killed run died is kept."""
    for folder in folders:
        logs = [p for p in (*folder.glob("*.log"), folder / "flower-run.json") if p.is_file()]
        logs = [p for p in logs if ".attempt-" not in p.name]
        attempt = 1
        while any(p.with_name(f"{p.stem}.attempt-{attempt}{p.suffix}").exists() for p in logs):
            attempt += 1
        for path in logs:
            path.rename(path.with_name(f"{path.stem}.attempt-{attempt}{path.suffix}"))


def run_config_of(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """``flhf run/loopback``'s config and number of users: a new run's (``--users``, else
    ``min-available-nodes``, at least 2), or with ``--resume`` the resumed run's."""
    if args.resume:
        if args.items and "=" not in args.items[0]:
            raise ConfigError(f"--resume continues a run with its own config: no preset ({args.items[0]!r}).")
        config, users = resumed_config(Path(args.resume), args.items, args.users)
        run_dir = Path(config["results-dir"]) / config["run-name"]
        keep_earlier_logs(run_dir, run_dir.with_name(f"{run_dir.name}.deployment"))
        return config, users
    preset, overrides = split_items(args.items)
    config = merged_config(preset, overrides)
    minimum = int(config["min-available-nodes"])
    if args.users is not None and args.users < minimum:
        raise ConfigError(
            f"--users {args.users}: the run waits for min-available-nodes={minimum} users before each "
            f"round; give --users {minimum} or more, or min-available-nodes={args.users}."
        )
    config["run-name"] = claim_run_dir(Path(config["results-dir"]), config["run-name"]).name
    return config, args.users or max(minimum, 2)


def guard_launch() -> None:
    """Before a launcher starts anything: SIGTERM and Ctrl-C unwind it (it stops what it started on
    the way out), and a watchdog stops what a SIGKILLed launcher cannot (:mod:`.watchdog`)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the run even where a shell started us with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    watchdog.start()


def command_run(args: argparse.Namespace) -> int:
    config, users = run_config_of(args)
    guard_launch()
    return launch_simulation(config, users, args.cpus_per_user, not args.quiet)


def command_loopback(args: argparse.Namespace) -> int:
    """The same run in Flower's deployment engine: a SuperLink and N SuperNodes on 127.0.0.1."""
    config, users = run_config_of(args)
    guard_launch()
    run_dir = Path(config["results-dir"]) / config["run-name"]
    workdir = Path(config["results-dir"]) / f"{config['run-name']}.deployment"
    print(f"flhf: results will be written to {run_dir}; process logs to {workdir}", flush=True)
    data_files = parse_data_files(args.data_file, users)
    with Loopback(
        workdir, users, state_dir=workdir / "user-state", secure=args.secure, data_files=data_files
    ) as federation:
        how = "TLS, authenticated SuperNodes" if args.secure else "insecure"
        print(f"flhf: SuperLink and {users} SuperNodes up (127.0.0.1:{federation.port}, {how})", flush=True)
        code = submit_and_follow(config, [CONNECTION], not args.quiet, federation.env(), federation.alive)
    report(code, config)
    return code


def parse_data_files(items: list[str], users: int) -> dict[int, Path]:
    """``USER=FILE`` options: which users' SuperNodes hold their own data file."""
    files = {}
    for item in items:
        user, _, path = item.partition("=")
        if not user.strip().isdigit() or not 0 <= int(user) < users or not path:
            raise ConfigError(f"--data-file {item!r}: expected USER=FILE with USER in [0, {users}).")
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"--data-file {item!r}: {path} does not exist.")
        files[int(user)] = Path(path).expanduser().resolve()
    return files


def command_credentials(args: argparse.Namespace) -> int:
    """A CA, the SuperLink's certificate and one key pair per SuperNode, for the secure profile."""
    from flhf_core.runs import credentials

    hosts = tuple(args.host or ("superlink", "localhost", "127.0.0.1"))
    made = credentials.generate(Path(args.out), args.users, hosts)
    credentials.superexec_secrets(Path(args.out), args.users)
    print(
        f"flhf: wrote a CA, a SuperLink certificate for {', '.join(hosts)}, {args.users} SuperNode keys and "
        f"the SuperExecs' secrets to {Path(args.out).resolve()}; keep ca.key off the server once you are done signing"
    )
    print(
        f"flhf: the SuperNodes' public keys, to register once the SuperLink is up: {made.public_key(0).parent}"
    )
    return 0


def command_register_nodes(args: argparse.Namespace) -> int:
    """Register every ``supernode-*.pub`` of a credentials folder with a secure SuperLink."""
    import json
    import subprocess
    import tempfile

    from flhf_core.runs.deploy import flower_bin, flower_env, write_connection

    folder = Path(args.credentials).expanduser().resolve()
    keys = sorted(folder.glob("supernode-*.pub"))
    if not keys or not (folder / "ca.crt").is_file():
        raise ConfigError(
            f"register-nodes: {folder} holds no ca.crt and supernode-*.pub (see flhf credentials)."
        )
    host, _, port = args.superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--superlink {args.superlink!r}: expected HOST:PORT.")
    with tempfile.TemporaryDirectory(prefix="flhf-register-") as home:
        write_connection(Path(home), int(port), f'root-certificates = "{folder / "ca.crt"}"', host=host)
        for key in keys:
            result = subprocess.run(
                [flower_bin("flwr"), "supernode", "register", str(key), CONNECTION, "--format", "json"],
                capture_output=True,
                text=True,
                env=flower_env(FLWR_HOME=home),
                check=False,
            )
            try:
                node_id = json.loads(result.stdout)["node-id"]
            except (json.JSONDecodeError, KeyError):
                print(f"flhf: could not register {key.name}: {result.stdout}{result.stderr}", file=sys.stderr)
                return 1
            print(f"flhf: registered {key.name} as node {node_id}")
    return 0


def command_export_data(args: argparse.Namespace) -> int:
    from flhf_core.data import partitions

    preset, overrides = split_items(args.items)
    config = RunConfig.from_mapping(merged_config(preset, overrides))
    corpus = load_corpus(config)
    count = partitions.export_user_documents(corpus, args.user, args.users, config, Path(args.out))
    print(f"flhf: wrote user {args.user}'s {count} documents (of {args.users} users) to {args.out}")
    return 0


def command_build_tokenizer(args: argparse.Namespace) -> int:
    from flhf_core.learning import model

    corpus = load_corpus(RunConfig.from_mapping({"document-sections": "abstract,introduction,conclusion"}))
    # the official train and validation papers only: no word of a held-out paper shapes it
    known = [d for d in corpus.documents if d.split != "test"]
    tokenizer = model.train_tokenizer(model.corpus_texts(corpus, known), args.vocab_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tokenizer.to_str())
    print(f"wrote {out} ({tokenizer.get_vocab_size()} tokens, sha256 {model.sha256(out.read_bytes())[:12]})")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    """Runs side by side: a Markdown table and a plot of their reward curves."""
    from flhf_core.runs.compare import compare

    out = Path(args.out) if args.out else Path(args.run_dirs[0]).resolve().parent
    table, plot = compare([Path(d) for d in args.run_dirs], out)
    print(table.read_text(), end="")
    print(f"flhf: wrote {table} and {plot}")
    return 0


def command_summarize(args: argparse.Namespace) -> int:
    """Summarize a text file with a finished run's global model, or one user's personalized model."""
    from flhf_core.client import personal
    from flhf_core.common import read_json
    from flhf_core.data.partitions import NEUTRAL_INSTRUCTION, instruction_for
    from flhf_core.learning.generate import summarize
    from flhf_core.learning.model import load_pretrained, with_personal_parameters

    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not an FLHF run (no config.json).")
    config = RunConfig.from_saved(read_json(run_dir / "config.json"))
    model_dir = run_dir / "model"
    if not config.has_global_model:  # local-head: the shared body, completed by a user's own head
        if args.user is None:
            raise ConfigError(
                f"{run_dir} has no global model (personalization=local-head or mode=local-only); use --user K."
            )
        model_dir = run_dir / "checkpoints" / "latest"
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a finished FLHF run (no {model_dir.name}/ folder).")
    text_path = Path(args.text)
    if not text_path.is_file():
        raise ConfigError(f"text file {text_path} does not exist.")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_pretrained(model_dir)
    if args.user is not None:
        state = (
            Path(args.state) if args.state else run_dir / "users" / f"user-{args.user}" / personal.STATE_FILE
        )
        if config.personal_scope == "none" or not state.is_file():
            raise ConfigError(
                f"user {args.user} has no personal state at {state} (personalization: "
                f"{config.personalization}, mode: {config.mode})."
            )
        model = with_personal_parameters(model, config, seed=0)
        personal.load_into(model, state)
    instruction = (
        (instruction_for(config, args.aspect) or args.aspect) if args.aspect else NEUTRAL_INSTRUCTION
    )
    if args.user is not None and config.personalization == "code-bandit" and not args.aspect:
        from flhf_core.data.codes import all_codes
        from flhf_core.learning.code_bandit import served_prompt

        # the user asks with the code its judgements chose
        instruction = served_prompt(model, [c.prompt for c in all_codes(config.aspects)]) or instruction
    text = " ".join(text_path.read_text().split())
    if args.aspect:  # read what the run's model was trained to read (extracted sentences, if it extracts)
        from flhf_core.data.corpus import Document
        from flhf_core.data.partitions import reading

        text = reading(Document("summarize", text, text, ()), args.aspect, config)
    source = f"{instruction}: {text}"
    (summary,) = summarize(model, tokenizer, [source], config)
    print(summary)
    return 0


def command_bounds(args: argparse.Namespace) -> int:
    from flhf_core.common import read_json
    from flhf_core.runs.bounds import write_bounds

    path = write_bounds(Path(args.run_dir))
    result = read_json(path)
    for method, mean in result["mean"].items():
        print(f"{method:18s} reward {mean:.3f}  worst user {result['worst'][method]:.3f}")
    print(
        "code steering (held-out papers): words written / asked, ROUGE-L to its own target / to the others'"
    )
    for code, f in result["code-steering"].items():
        print(
            f"  {code:24s} {f['words']:5.1f} / {f['code-words']:2.0f} words  "
            f"{f['rougeL-own-target']:.3f} / {f['rougeL-other-targets']:.3f}"
        )
    print(
        f"on the reward documents: oracle {result['oracle-reward-documents']:.3f}, "
        f"best shared code {result['best-shared-code-reward-documents']:.3f}"
    )
    print(f"best shared code: {result['best-shared-code']}; wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flhf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a preset in Flower's simulation engine")
    run.add_argument(
        "items",
        nargs="*",
        metavar="[PRESET] [key=value ...]",
        help="a preset (a name in configs/, default 'default', or a .toml path), then run-config overrides",
    )
    run.add_argument("--users", type=int, help="simulated users (default: the preset's min-available-nodes)")
    run.add_argument("--quiet", action="store_true", help="do not stream the run's logs")
    run.add_argument(
        "--cpus-per-user",
        type=int,
        help="CPUs and torch threads per simulated user (default: the cores shared by the users that run at once)",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed or finished run from its last checkpoint, in its folder "
        "(key=value may change only num-server-rounds, round-timeout, tracking, ...: see docs/results.md)",
    )
    run.set_defaults(handler=command_run)
    loopback = commands.add_parser(
        "loopback", help="run in Flower's deployment engine: a SuperLink and N SuperNodes on 127.0.0.1"
    )
    loopback.add_argument("items", nargs="*", metavar="[PRESET] [key=value ...]", help="as for run")
    loopback.add_argument("--users", type=int, help="SuperNodes to start (default: min-available-nodes)")
    loopback.add_argument("--quiet", action="store_true", help="do not stream the run's logs")
    loopback.add_argument(
        "--secure",
        action="store_true",
        help="TLS with a generated CA, and SuperNode authentication (keys registered before the nodes start)",
    )
    loopback.add_argument(
        "--data-file",
        action="append",
        default=[],
        metavar="USER=FILE",
        help="user USER's SuperNode serves it from its own data file (see `flhf export-data`); repeatable",
    )
    loopback.add_argument(
        "--resume", metavar="RUN_DIR", help="as for run (the users' state folders are kept)"
    )
    loopback.set_defaults(handler=command_loopback)
    creds = commands.add_parser(
        "credentials", help="a CA, a SuperLink certificate and SuperNode keys (docker-compose.secure.yml)"
    )
    creds.add_argument("--out", default="deploy/credentials", help="the folder to write them to")
    creds.add_argument("--users", type=int, default=3, help="SuperNode key pairs (supernode-<k>.key)")
    creds.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or address the SuperLink's certificate is valid for (repeatable; default: superlink, localhost, 127.0.0.1)",
    )
    creds.set_defaults(handler=command_credentials)
    register = commands.add_parser(
        "register-nodes",
        help="register every SuperNode public key of a credentials folder with a secure SuperLink",
    )
    register.add_argument("credentials", help="the folder flhf credentials wrote")
    register.add_argument("--superlink", default="127.0.0.1:9093", help="HOST:PORT of the SuperLink")
    register.set_defaults(handler=command_register_nodes)
    export = commands.add_parser(
        "export-data",
        help="write one user's documents as a data file of its own (for a SuperNode's data-file)",
    )
    export.add_argument("items", nargs="*", metavar="[PRESET] [key=value ...]", help="as for run")
    export.add_argument("--user", type=int, required=True, help="the user (partition id)")
    export.add_argument("--users", type=int, required=True, help="the number of users (num-partitions)")
    export.add_argument("--out", required=True, help="the JSONL file to write")
    export.set_defaults(handler=command_export_data)
    compare = commands.add_parser(
        "compare", help="runs side by side: a Markdown table and their reward curves"
    )
    compare.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, <results-dir>/<run-name>"
    )
    compare.add_argument(
        "--out", help="where comparison.md and comparison.png go (default: the first run's parent)"
    )
    compare.set_defaults(handler=command_compare)
    summarize = commands.add_parser("summarize", help="summarize a text file with a finished run's model")
    summarize.add_argument("run_dir", help="a run's results folder, <results-dir>/<run-name>")
    summarize.add_argument("text", help="a plain-text file to summarize")
    summarize.add_argument("--user", type=int, help="use this user's personalized model")
    summarize.add_argument("--state", help="the user's personal state file, if not under the run folder")
    summarize.add_argument("--aspect", help="ask for an aspect (e.g. outcome) instead of a neutral summary")
    summarize.set_defaults(handler=command_summarize)
    bounds = commands.add_parser(
        "bounds",
        help="what personalization could gain over a finished codes run's global model (bounds.json)",
    )
    bounds.add_argument("run_dir", help="a run's results folder, <results-dir>/<run-name>")
    bounds.set_defaults(handler=command_bounds)
    tok = commands.add_parser("build-tokenizer", help="train the shipped aclsum tokenizer")
    tok.add_argument("--vocab-size", type=int, default=6000)
    tok.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "aclsum-tokenizer.json")
    )
    tok.set_defaults(handler=command_build_tokenizer)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the launcher is, so that it stops what it started on its way out."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra:  # overrides that followed an option, as in `flhf run smoke --quiet seed=1`
        if args.command not in ("run", "loopback") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items += extra
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"flhf: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: everything started is stopped by now
        terminated = isinstance(interrupt, Terminated)
        print(
            f"flhf: {'terminated' if terminated else 'interrupted'}; every process it started is stopped",
            file=sys.stderr,
        )
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
