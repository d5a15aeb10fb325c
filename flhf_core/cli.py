"""The ``flhf`` command: run a preset with overrides, build the shipped tokenizer.

``flhf run [PRESET] [key=value ...]`` exists because ``flwr run`` refuses a
preset file together with ``key=value`` overrides, and answers an unknown key
with a bare "Invalid run configuration". It merges pyproject's defaults, the
preset and the overrides; validates them with :class:`RunConfig` (an error
names the key and what is allowed); resolves ``results-dir`` to an absolute
path; starts a local simulation SuperLink if none is running (and stops it
afterwards, by PID); submits the run with ``flwr run``; streams its logs; and
exits with the run's real status, which ``flwr run --stream`` does not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from .config import PYPROJECT, ConfigError, RunConfig, load_preset, pyproject_defaults
from .tracking import atomic_write_text

PROJECT_DIR = PYPROJECT.parent


def flower_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (it need not be activated)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


PRESETS_DIR = PROJECT_DIR / "configs"
RUNTIME_ENV = {
    # Flower would otherwise build a fresh environment per run (and fetch CUDA torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # The SuperLink spawns flower-superexec and flwr-* by name: find this environment's.
    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
}


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value; bare words are strings (``dataset=aclsum``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value.")
    key, raw = (part.strip() for part in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def resolve_preset(name: str | None) -> Path | None:
    if name is None:
        return PRESETS_DIR / "default.toml"
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    candidate = PRESETS_DIR / f"{name}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
    raise ConfigError(f"preset {name!r} not found; presets: {', '.join(known)}, or a path to a .toml file.")


def merged_config(preset: str | None, overrides: list[str]) -> dict[str, Any]:
    """Defaults <- preset <- overrides, validated, with an absolute results-dir and a run name."""
    values = dict(pyproject_defaults())
    preset_path = resolve_preset(preset)
    if preset_path is not None:
        values.update(load_preset(preset_path))
    values.update(parse_override(item) for item in overrides)
    config = RunConfig.from_mapping(values)  # names any bad key or value
    run_name = config.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    candidate, suffix = run_name, 1
    while (config.results_path / candidate).exists():
        suffix += 1
        candidate = f"{run_name}-{suffix}"
    return config.replace(**{"results-dir": str(config.results_path), "run-name": candidate}).to_mapping()


# --------------------------------------------------------------------------
# Local SuperLink
# --------------------------------------------------------------------------
def _local_ports() -> tuple[str, str]:
    from flwr.cli.constant import LOCAL_CONTROL_API_PORT, LOCAL_SUPERLINK_HTTP_API_PORT

    return LOCAL_SUPERLINK_HTTP_API_PORT, LOCAL_CONTROL_API_PORT


def superlink_running(http_port: str) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False


def start_local_superlink(log_file: Path) -> subprocess.Popen:
    """A simulation SuperLink in its own session, as ``flwr run`` would start it."""
    http_port, control_port = _local_ports()
    command = [flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess"]
    command += ["--disable-runtime-dependency-installation"]
    command += ["--control-api-address", f"127.0.0.1:{control_port}"]
    command += ["--host", "127.0.0.1", "--port", http_port]
    fleet = os.environ.get("FLHF_FLEET_API_ADDRESS")
    if fleet:
        command += ["--fleet-api-address", fleet]
    log = log_file.open("ab")
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **RUNTIME_ENV},
        cwd=PROJECT_DIR,
    )
    deadline = time.monotonic() + 30
    while not superlink_running(http_port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_group(process)
            raise RuntimeError(f"flower-superlink did not start; see {log_file}")
        time.sleep(0.2)
    return process


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process's whole group, then SIGKILL what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# --------------------------------------------------------------------------
# flwr run, and the run's real status
# --------------------------------------------------------------------------
def _flwr(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **RUNTIME_ENV}
    command = [flower_bin("flwr"), *args]
    return subprocess.run(command, capture_output=capture, text=True, env=env, check=False)


def run_status(run_id: str) -> tuple[str, str]:
    """``(status, details)`` of a run, from ``flwr ls --format json``."""
    result = _flwr("ls", "--run-id", run_id, "--format", "json")
    try:
        run = json.loads(result.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", result.stdout + result.stderr


def submit_and_follow(config: dict[str, Any], users: int, stream: bool) -> int:
    """Submit the run, follow it to its end, and return 0 only if it completed."""
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as f:
        f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()).encode())
        config_file = f.name
    try:
        result = _flwr(
            "run",
            str(PROJECT_DIR),
            "--run-config",
            config_file,
            "--federation-config",
            f"num-supernodes={users}",
            "--format",
            "json",
        )
    finally:
        os.unlink(config_file)
    try:
        run_id = str(json.loads(result.stdout)["run-id"])
    except (json.JSONDecodeError, KeyError):
        print(f"flhf: flwr run failed:\n{result.stdout}{result.stderr}", file=sys.stderr)
        return 1
    print(f"flhf: run {run_id} submitted with {users} users", flush=True)
    log_lines = follow_logs(run_id, echo=stream)
    status, details = run_status(run_id)
    for _ in range(30):  # the log stream can end a moment before the status is final
        if status.startswith("finished"):
            break
        time.sleep(1.0)
        status, details = run_status(run_id)
    run_dir = Path(config["results-dir"]) / config["run-name"]
    if run_dir.is_dir():
        atomic_write_text(run_dir / "flower.log", "".join(log_lines))
    print(f"flhf: run {run_id} {status}" + (f": {details}" if details and details != "N/A" else ""))
    return 0 if status == "finished:completed" else 1


def follow_logs(run_id: str, echo: bool) -> list[str]:
    """Stream the run's logs until the run ends (``flwr log --stream`` returns then)."""
    process = subprocess.Popen(
        [flower_bin("flwr"), "log", run_id, "--stream"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **RUNTIME_ENV},
    )
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        process.wait()
    except KeyboardInterrupt:
        print(f"flhf: interrupted; stopping run {run_id}", file=sys.stderr)
        process.terminate()
        _flwr("stop", run_id)
        raise
    return lines


def command_run(args: argparse.Namespace) -> int:
    has_preset = bool(args.items) and "=" not in args.items[0]
    preset, overrides = (args.items[0], args.items[1:]) if has_preset else (None, args.items)
    config = merged_config(preset, overrides)
    users = args.users or max(int(config["min-available-nodes"]), 2)
    run_dir = Path(config["results-dir"]) / config["run-name"]
    print(f"flhf: results will be written to {run_dir}", flush=True)
    http_port, _ = _local_ports()
    superlink = None
    if not superlink_running(http_port):
        log_file = Path(config["results-dir"]) / "superlink.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        superlink = start_local_superlink(log_file)
    try:
        code = submit_and_follow(config, users, stream=not args.quiet)
    finally:
        if superlink is not None:
            stop_process_group(superlink)
    if code == 0 and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        k = config["lead-words"]
        print(
            f"flhf: held-out ROUGE-L {summary['rougeL']:.2f} (round 0: {summary['rougeL-round0']:.2f}, "
            f"lead-{k} baseline: {summary[f'baseline-lead{k}-rougeL']:.2f}); results in {run_dir}"
        )
    return code


def command_build_tokenizer(args: argparse.Namespace) -> int:
    from . import data, model

    corpus = data.load_corpus(
        RunConfig.from_mapping({"document-sections": "abstract,introduction,conclusion"})
    )
    tokenizer = model.train_tokenizer(model.corpus_texts(corpus), args.vocab_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tokenizer.to_str())
    print(f"wrote {out} ({tokenizer.get_vocab_size()} tokens, sha256 {model.sha256(out.read_bytes())[:12]})")
    return 0


def command_summarize(args: argparse.Namespace) -> int:
    """Summarize a text file with a finished run's global model, or one user's personalized model."""
    from . import personal
    from .data import NEUTRAL_INSTRUCTION
    from .generate import DecodingConfig, generate_summaries
    from .model import add_lora, load_pretrained
    from .tracking import read_json

    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "model" / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a finished FLHF run (no model/ folder).")
    text_path = Path(args.text)
    if not text_path.is_file():
        raise ConfigError(f"text file {text_path} does not exist.")
    config = RunConfig.from_mapping(read_json(run_dir / "config.json"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    model = load_pretrained(run_dir / "model")
    if args.user is not None:
        state = (
            Path(args.state) if args.state else run_dir / "users" / f"user-{args.user}" / personal.STATE_FILE
        )
        if config.personalization == "none" or not state.is_file():
            raise ConfigError(
                f"user {args.user} has no personal state at {state} (personalization: "
                f"{config.personalization})."
            )
        if config.personalization == "lora":
            model = add_lora(model, config.lora_rank, seed=0)
        personal.load_into(model, state)
    instruction = args.aspect or NEUTRAL_INSTRUCTION
    source = f"{instruction}: {' '.join(text_path.read_text().split())}"
    (summary,) = generate_summaries(
        model, tokenizer, [source], DecodingConfig.from_run_config(config), config.max_source_tokens
    )
    print(summary)
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
    run.set_defaults(handler=command_run)
    summarize = commands.add_parser("summarize", help="summarize a text file with a finished run's model")
    summarize.add_argument("run_dir", help="a run's results folder, <results-dir>/<run-name>")
    summarize.add_argument("text", help="a plain-text file to summarize")
    summarize.add_argument("--user", type=int, help="use this user's personalized model")
    summarize.add_argument("--state", help="the user's personal state file, if not under the run folder")
    summarize.add_argument("--aspect", help="ask for an aspect (e.g. outcome) instead of a neutral summary")
    summarize.set_defaults(handler=command_summarize)
    tok = commands.add_parser("build-tokenizer", help="train the shipped aclsum tokenizer")
    tok.add_argument("--vocab-size", type=int, default=6000)
    tok.add_argument("--out", default=str(Path(__file__).parent / "assets" / "aclsum-tokenizer.json"))
    tok.set_defaults(handler=command_build_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra:  # overrides that followed an option, as in `flhf run smoke --quiet seed=1`
        if args.command != "run" or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.items += extra
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"flhf: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
