"""docker-compose.yml: valid for Compose v2 (offline) and every command parses with Flower's own CLIs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

from flhf_core.config import PYPROJECT

ROOT = PYPROJECT.parent
COMPOSE = Path(__import__("compose").__file__).parent / "docker-compose"


def compose_services(*files: str) -> dict:
    command = [str(COMPOSE)]
    for name in files:
        command += ["-f", str(ROOT / name)]
    result = subprocess.run(
        [*command, "config", "--format", "json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr  # Compose v2 validates the files offline
    return json.loads(result.stdout)["services"]


@pytest.fixture(scope="module")
def services() -> dict:
    return compose_services("docker-compose.yml")


@pytest.fixture(scope="module")
def secure() -> dict:
    return compose_services("docker-compose.yml", "docker-compose.secure.yml")


def test_the_default_publishes_the_unauthenticated_superlink_on_this_hosts_loopback_only(services):
    assert [(p.get("host_ip"), str(p["published"])) for p in services["superlink"]["ports"]] == [
        ("127.0.0.1", "9093")
    ]
    assert "--insecure" in services["superlink"]["command"]


def test_the_secure_profile_runs_tls_and_authenticated_supernodes(secure):
    link = superlink_parser().parse_args(secure["superlink"]["command"])
    assert not link.insecure and link.enable_supernode_auth
    assert (link.ssl_ca_certfile, link.ssl_certfile, link.ssl_keyfile) == (
        "/credentials/ca.crt",
        "/credentials/server.pem",
        "/credentials/server.key",
    )
    mounted = {v["target"] for v in secure["superlink"]["volumes"]}
    assert {link.ssl_ca_certfile, link.ssl_certfile, link.ssl_keyfile} <= mounted
    assert [p.get("host_ip") for p in secure["superlink"]["ports"]] == [None]  # published widely: it is safe
    server = superexec_parser().parse_args(secure["serverapp"]["command"])
    assert server.root_certificates == "/credentials/ca.crt" and not server.insecure
    assert server.superexec_auth_secret_file == link.superexec_auth_secret_file  # the pair shares a secret
    for user in range(3):
        node = supernode_parser().parse_args(secure[f"supernode-{user}"]["command"])
        assert not node.insecure and node.root_certificates == "/credentials/ca.crt"
        assert node.auth_supernode_private_key == f"/credentials/supernode-{user}.key"
        assert f"partition-id={user} num-partitions=3" in node.node_config
        secret = f"/credentials/superexec-{user}.secret"
        keys = {v["target"] for v in secure[f"supernode-{user}"]["volumes"]}
        assert keys == {"/credentials/ca.crt", f"/credentials/supernode-{user}.key", secret}  # its own only
        executor = superexec_parser().parse_args(secure[f"clientapp-{user}"]["command"])
        assert node.superexec_auth_secret_file == executor.superexec_auth_secret_file == secret
    assert 'data-file="/data/user-2.jsonl"' in secure["supernode-2"]["command"][-1]


def test_flhf_credentials_writes_what_the_secure_profile_mounts(secure, tmp_path):
    from flhf_core.runs import cli

    assert cli.main(["credentials", "--out", str(tmp_path / "credentials")]) == 0
    for service in secure.values():
        for volume in service.get("volumes", []):
            source = Path(volume["source"])
            if source.parent.name == "credentials":
                assert (tmp_path / "credentials" / source.name).is_file(), source.name
    assert (tmp_path / "credentials" / "supernode-0.key").stat().st_mode & 0o777 == 0o600


def test_layout_has_a_superlink_a_serverapp_and_three_users(services):
    assert {"superlink", "serverapp"} <= set(services)
    users = sorted(name for name in services if name.startswith("supernode-"))
    assert users == ["supernode-0", "supernode-1", "supernode-2"]
    for user in range(3):
        assert f"clientapp-{user}" in services


def test_superlink_command_parses_and_listens_on_all_interfaces(services):
    args = superlink_parser().parse_args(services["superlink"]["command"])
    assert args.host == "0.0.0.0" and args.isolation == "process"
    assert str(args.port) in {str(p["target"]) for p in services["superlink"]["ports"]}


def test_supernode_and_executor_commands_parse(services):
    port = superlink_parser().parse_args(services["superlink"]["command"]).port
    for user in range(3):
        node = supernode_parser().parse_args(services[f"supernode-{user}"]["command"])
        assert node.superlink == f"superlink:{port}" and node.isolation == "process"
        assert f"partition-id={user} num-partitions=3" in node.node_config
        executor = superexec_parser().parse_args(services[f"clientapp-{user}"]["command"])
        assert executor.runtime_api_address == f"supernode-{user}:{node.port}"
        assert any(v["target"] == "/state" for v in services[f"clientapp-{user}"]["volumes"])
    server = superexec_parser().parse_args(services["serverapp"]["command"])
    assert server.runtime_api_address == f"superlink:{port}"


def test_one_user_holds_its_own_data_file_only_its_client_container_sees(services):
    node = supernode_parser().parse_args(services["supernode-2"]["command"])
    assert 'data-file="/data/user-2.jsonl"' in node.node_config
    mounts = {v["target"]: v for v in services["clientapp-2"]["volumes"]}
    assert Path(mounts["/data/user-2.jsonl"]["source"]) == ROOT / "deploy" / "user-2.jsonl"
    assert (ROOT / "deploy" / "user-2.jsonl").is_file()
    for name in ("serverapp", "clientapp-0", "clientapp-1"):  # nobody else mounts it
        assert all(v.get("target") != "/data/user-2.jsonl" for v in services[name].get("volumes", []))
    assert services["clientapp-2"]["environment"]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"


def test_the_app_bundle_every_party_receives_holds_no_users_data():
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    assert "server_app.py" in names and "flhf_core/assets/aclsum-tokenizer.json" in names
    assert not [n for n in names if n.startswith("deploy/") or n.endswith((".jsonl", ".csv"))]


def test_image_builds_from_the_pinned_superexec():
    dockerfile = (ROOT / "Dockerfile").read_text()
    import flwr

    assert f"FROM flwr/superexec:{flwr.__version__}" in dockerfile
    assert "torch==2.13.0" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
