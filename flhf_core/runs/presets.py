"""A run's config from the command line: pyproject's defaults, a preset, ``key=value`` overrides.

``flwr run`` refuses a preset file together with ``key=value`` overrides; :func:`merged_config`
merges the three, validates them with :class:`~flhf_core.config.RunConfig` (an error names
the key and what is allowed), and resolves the paths the apps read from another working
directory. :func:`resumed_config` is the config that continues a killed run.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

from flhf_core.config import ConfigError, RunConfig, load_preset, pyproject_defaults
from flhf_core.runs.launcher import PROJECT_DIR

PRESETS_DIR = PROJECT_DIR / "configs"


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
    if config.resume:  # a new run always gets a folder of its own: it cannot also resume one
        raise ConfigError(
            "resume: a new run cannot set resume=true (it would start in a new folder and find no "
            "checkpoint there); continue a run with: flhf run --resume RUN_DIR [key=value ...]"
        )
    run_name = config.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    candidate, suffix = run_name, 1
    while (config.results_path / candidate).exists():
        suffix += 1
        candidate = f"{run_name}-{suffix}"
    resolved = {"results-dir": str(config.results_path), "run-name": candidate}
    if Path(config.user_profiles).expanduser().is_file():  # the apps run in the SuperLink's directory
        resolved["user-profiles"] = str(Path(config.user_profiles).expanduser().resolve())
    if config.init_from:
        resolved["init-from"] = str(config.init_from_path)
    return config.replace(**resolved).to_mapping()


def resumed_config(
    run_dir: Path, overrides: list[str], users: int | None = None
) -> tuple[dict[str, Any], int]:
    """The config that continues ``run_dir`` from its last checkpoint: the checkpoint's own, with
    ``overrides`` of the keys a resume may change; and its number of users (``users``, if
    given, must be the checkpoint's). An error names anything else that differs."""
    from flhf_core.results.checkpoint import CheckpointError, check_resumable, load_checkpoint

    run_dir = run_dir.expanduser().resolve()
    checkpoint = load_checkpoint(run_dir)
    values = {**checkpoint.config, **dict(parse_override(item) for item in overrides)}
    values.update({"results-dir": str(run_dir.parent), "run-name": run_dir.name, "resume": True})
    check_resumable(checkpoint.config, values)
    config = RunConfig.from_mapping(values)
    if config.num_server_rounds < checkpoint.server_round:
        raise CheckpointError(
            f"num-server-rounds: {config.num_server_rounds} is below the checkpoint's round "
            f"({checkpoint.server_round}); a resume can only go on from there."
        )
    if users is not None and users != checkpoint.num_users:
        raise CheckpointError(
            f"--users {users}: the run has {checkpoint.num_users} users (they define its data partitions)."
        )
    print(
        f"flhf: resuming {run_dir} after round {checkpoint.server_round} of {config.num_server_rounds}",
        flush=True,
    )
    return config.to_mapping(), checkpoint.num_users


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """``[PRESET] [key=value ...]``: a first item without ``=`` names the preset."""
    has_preset = bool(items) and "=" not in items[0]
    return (items[0], items[1:]) if has_preset else (None, items)
