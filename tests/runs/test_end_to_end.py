"""The smoke preset through Flower's simulation engine, as a user runs it."""

from __future__ import annotations

import os

import pytest
from flower_runs import (
    flhf,
    free_port,
    processes_mentioning,
)

from flhf_core.config import RunConfig
from flhf_core.server.main import run_federation


@pytest.fixture
def isolated_flower(tmp_path):
    """Own FLWR_HOME and ports, so the test neither uses nor disturbs another SuperLink."""
    port = free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    return env, port


@pytest.mark.flower
def test_bad_key_is_refused_before_anything_starts(tmp_path, isolated_flower):
    env, port = isolated_flower
    result = flhf("run", "smoke", "local-epoch=3", f"results-dir={tmp_path}", env=env)
    assert result.returncode == 2
    assert "unknown run-config key 'local-epoch'. Did you mean 'local-epochs'?" in result.stderr
    assert not list(tmp_path.iterdir()) and not processes_mentioning(f"--port {port}")


def test_serverapp_with_bad_data_writes_nothing(tmp_path):
    from flwr.app import Context, RecordDict

    config = RunConfig(dataset=str(tmp_path / "missing.jsonl"), results_dir=str(tmp_path / "results"))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config.to_mapping())
    with pytest.raises(ValueError, match=r"missing\.jsonl does not exist"):
        run_federation(grid=None, context=context)
    assert not (tmp_path / "results").exists()
