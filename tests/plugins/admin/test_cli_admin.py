"""`nexgate db|users|orgs|keys`: the operator's commands, in-process and as a real subprocess."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

import nexgate_plugins.admin as admin_plugin
from tests.cli_runner import Cli
from nexgate_proxy.testing import FakeUpstream, chat, gateway_config


async def test_accounts_from_the_command_line(store_url: str, backend: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(capsys, "--storage-url", store_url)
    if backend == "sqlite":
        assert "db migrate" in await cli.fails("users", "list")  # no database file yet, none created
        assert not Path(store_url.removeprefix("sqlite:///")).exists()
    else:
        status = await cli.json("db", "status")
        assert status["version"] == 0 and status["up_to_date"] is False and status["pending"]
        assert "db migrate" in await cli.fails("users", "list")
    migrated = await cli.json("db", "migrate")
    assert migrated["applied"] and migrated["version"] == migrated["applied"][-1]
    assert (await cli.json("db", "migrate"))["applied"] == []
    code, out, _ = await cli("db", "status")
    assert code == 0 and "up to date" in out

    ann = await cli.json("users", "create", "--email", "ann@example.com", "--name", "Ann")
    bob = await cli.json("users", "create", "--external-id", "user_clerk_bob")
    assert ann["object"] == "user" and ann["email"] == "ann@example.com"
    assert [u["id"] for u in await cli.json("users", "list")] == [ann["id"], bob["id"]]
    code, out, _ = await cli("users", "list")
    assert code == 0 and ann["id"] in out and "ann@example.com" in out
    assert "conflict" in await cli.fails("users", "create", "--external-id", "user_clerk_bob")

    org = await cli.json("orgs", "create", "--name", "Acme", "--owner", ann["id"])
    assert org["owner_user_id"] == ann["id"]
    member = await cli.json("orgs", "add-member", org["id"], bob["id"], "--role", "admin")
    assert member["role"] == "admin"
    assert [(o["id"], o["role"]) for o in await cli.json("orgs", "list", "--user", bob["id"])] == [(org["id"], "admin")]
    assert [o["id"] for o in await cli.json("orgs", "list")] == [org["id"]]
    assert "already a member" in await cli.fails("orgs", "add-member", org["id"], bob["id"])
    assert "no such organization" in await cli.fails("orgs", "add-member", "org_nope", bob["id"])
    assert "no such user" in await cli.fails("orgs", "add-member", org["id"], "usr_nope")
    assert "last owner" in await cli.fails("orgs", "remove-member", org["id"], ann["id"])

    key = await cli.json("keys", "create", "--name", "ci", "--user", ann["id"], "--expires-at",
                         "2099-01-01T00:00:00+01:00", "--allowed-model", "gpt-test", "--limits", '{"rpm": 5}')
    assert key["key"].startswith(key["prefix"]) and key["user_id"] == ann["id"]
    assert key["expires_at"] == "2098-12-31T23:00:00Z"
    assert key["allowed_models"] == ["gpt-test"] and key["limits"] == {"rpm": 5}
    org_key = await cli.json("keys", "create", "--name", "prod", "--org", org["id"])
    code, out, _ = await cli("keys", "create", "--name", "human", "--user", bob["id"])
    plaintext = out.strip().splitlines()[-1]
    assert code == 0 and plaintext.startswith("ngk_") and "shown this once" in out

    listed = await cli.json("keys", "list")
    assert len(listed) == 3 and {key["id"], org_key["id"]} < {k["id"] for k in listed}
    assert [k["id"] for k in await cli.json("keys", "list", "--org", org["id"])] == [org_key["id"]]
    code, out, _ = await cli("keys", "list", "--user", ann["id"])
    for text in [json.dumps(listed), out]:
        assert key["key"] not in text and org_key["key"] not in text and plaintext not in text
        assert "$2b$" not in text and "secret_hash" not in text

    for bad in [["--expires-at", "2000-01-01T00:00:00Z"], ["--expires-at", "2099-01-01"], ["--limits", "[1]"]]:
        await cli.fails("keys", "create", "--name", "x", "--user", ann["id"], *bad)
    assert "no such user" in await cli.fails("keys", "create", "--name", "x", "--user", "usr_nope")

    revoked = await cli.json("keys", "revoke", key["id"])
    assert revoked["revoked_at"] is not None
    code, out, err = await cli("keys", "revoke", key["id"])
    assert code == 0 and "already revoked" in out
    assert "no such API key" in await cli.fails("keys", "revoke", "key_nope")
    assert key["id"] not in {k["id"] for k in await cli.json("keys", "list", "--user", ann["id"])}
    assert key["id"] in {k["id"] for k in await cli.json("keys", "list", "--user", ann["id"], "--include-revoked")}

    # The member leaves; the personal account stays.
    removed = await cli.json("orgs", "remove-member", org["id"], bob["id"])
    assert removed["deleted"] is True and removed["revoked_key_ids"] == []
    assert await cli.json("orgs", "list", "--user", bob["id"]) == []
    assert "not a member" in await cli.fails("orgs", "remove-member", org["id"], bob["id"])
    assert bob["id"] in {u["id"] for u in await cli.json("users", "list")}


async def test_clean_errors_for_unreachable_databases_and_configs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cli = Cli(capsys)
    err = await cli.fails("users", "list", "--storage-url", "postgresql://admin:hunter2@127.0.0.1:1/nexgate")
    assert "cannot open the database" in err and "hunter2" not in err
    assert "unsupported" in await cli.fails("users", "list", "--storage-url", "mysql://db/x")
    assert "cannot open" in await cli.fails("db", "migrate", "--storage-url", f"sqlite:///{tmp_path}")

    monkeypatch.delenv("NEXGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert "no config file" in await cli.fails("keys", "list")
    (tmp_path / "nexgate.yaml").write_text(yaml.safe_dump({"storage": {"url": f"sqlite:///{tmp_path}/d.db"}}))
    assert (await cli.json("db", "migrate"))["applied"]  # ./nexgate.yaml is found like `serve` finds it
    code, _, err = await cli("keys", "list", "--config", str(tmp_path / "missing.yaml"))
    assert code == 1 and "cannot read the file" in err


def test_the_admin_plugin_adds_its_commands_through_the_cli_hook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="nexgate")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    admin_plugin.nexgate_cli_commands(sub)
    url = f"sqlite:///{tmp_path}/n.db"
    args = parser.parse_args(["db", "migrate", "--storage-url", url])
    assert args.func(args) == 0
    assert "Applied migration" in capsys.readouterr().out
    args = parser.parse_args(["users", "create", "--email", "x@example.com", "--storage-url", url, "--json"])
    assert args.func(args) == 0
    created = json.loads(capsys.readouterr().out)
    args = parser.parse_args(["users", "list", "--storage-url", url, "--json"])
    assert args.func(args) == 0
    assert [(u["id"], u["email"]) for u in json.loads(capsys.readouterr().out)] == [(created["id"], "x@example.com")]
    with pytest.raises(SystemExit):
        parser.parse_args(["keys", "create", "--name", "x", "--storage-url", url])  # --user or --org required
    with pytest.raises(SystemExit):
        parser.parse_args(["orgs", "add-member", "org_a", "usr_b", "--role", "king"])


# ---------------------------------------------------------- with a running gateway


async def nexgate(cwd: Path, *argv: str) -> tuple[int, str, str]:
    """`python -m nexgate_proxy.cli ...` as a real subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "NEXGATE_CONFIG"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexgate_proxy.cli", *argv, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert b"Traceback" not in out + err, err.decode()
    return process.returncode or 0, out.decode(), err.decode()


async def provision_key(tmp_path: Path, config_file: Path) -> dict[str, Any]:
    code, out, err = await nexgate(tmp_path, "db", "migrate", "--config", str(config_file))
    assert code == 0, err
    code, out, err = await nexgate(tmp_path, "users", "create", "--email", "ops@example.com",
                                   "--config", str(config_file), "--json")
    assert code == 0, err
    user = json.loads(out)
    code, out, err = await nexgate(tmp_path, "keys", "create", "--name", "from-cli", "--user", user["id"],
                                   "--config", str(config_file), "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.redis
async def test_cli_revocation_reaches_a_running_gateway_at_once(
        tmp_path: Path, upstream: FakeUpstream, start_gateway, redis_url: str) -> None:
    storage = {"url": f"sqlite:///{tmp_path}/shared.db"}
    state = {"url": redis_url}
    config_file = tmp_path / "nexgate.yaml"
    config_file.write_text(yaml.safe_dump({"storage": storage, "state": state, "auth": {"bcrypt_rounds": 4}}))
    key = await provision_key(tmp_path, config_file)
    gw = await start_gateway(gateway_config(upstream, storage=storage, state=state))
    assert await chat(gw, key["key"]) == "Hello from upstream"  # verified, and now cached

    code, out, err = await nexgate(tmp_path, "keys", "revoke", key["id"], "--config", str(config_file))
    assert code == 0 and "Revoked" in out and "warning" not in err and "note" not in err
    started = time.monotonic()
    while True:
        try:
            await chat(gw, key["key"])
        except openai.AuthenticationError as exc:
            assert "revoked" in exc.message
            break
        assert time.monotonic() - started < 1.0, "the gateway still accepts a key revoked from the CLI"
        await asyncio.sleep(0.02)
