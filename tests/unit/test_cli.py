"""The `jobgate` command line: keys against a temporary SQLite, and param parsing."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from jobgate.auth import Principal, api_keys
from jobgate.cli import app, parse_param
from jobgate.commands.options import connected
from jobgate.config import Settings
from jobgate.errors import Unauthenticated
from jobgate.store import Database

KEY_RE = re.compile(r"jg_[A-Za-z0-9_-]{40}")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"JOBGATE_DATA_DIR": str(tmp_path / "data")}


def verify(data_dir: str, key: str) -> Principal:
    async def check() -> Principal:
        db = Database(Settings(data_dir=Path(data_dir)).database_url)
        try:
            return await api_keys.verify(db, key)
        finally:
            await db.aclose()

    api_keys.clear_cache()
    return asyncio.run(check())


def test_keys_create_prints_the_key_alone_on_the_last_line(
    runner: CliRunner, env: dict[str, str]
) -> None:
    """`keys create` migrates the embedded SQLite and prints a working key last."""
    result = runner.invoke(
        app, ["keys", "create", "--owner", "ops", "--role", "admin", "--role", "user"], env=env
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    assert KEY_RE.fullmatch(key)
    principal = verify(env["JOBGATE_DATA_DIR"], key)
    assert (principal.id, principal.roles) == ("ops", frozenset({"admin", "user"}))


def test_keys_create_with_an_expiry(runner: CliRunner, env: dict[str, str]) -> None:
    """`--expires-in DAYS` sets an expiry that `keys list --json` shows."""
    result = runner.invoke(
        app, ["keys", "create", "--owner", "o", "--role", "viewer", "--expires-in", "2"], env=env
    )
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["keys", "list", "--json"], env=env)
    keys = json.loads(listed.stdout)["api_keys"]
    assert len(keys) == 1
    assert keys[0]["expires_at"].endswith("Z")
    assert keys[0]["owner"] == "o"


def test_keys_create_refuses_unknown_roles(runner: CliRunner, env: dict[str, str]) -> None:
    """An unknown role exits 2 with a message, and prints no key."""
    result = runner.invoke(app, ["keys", "create", "--owner", "o", "--role", "root"], env=env)
    assert result.exit_code == 2
    assert not KEY_RE.search(result.stdout)


@pytest.mark.parametrize("owner", ["", "   ", "o" * 256])
def test_keys_create_refuses_an_owner_the_api_would_refuse(
    runner: CliRunner, env: dict[str, str], owner: str
) -> None:
    """A blank or over-long owner exits 2 with the reason and creates no key, as
    `POST /v1/api-keys` answers 422 (regression: a key acting as user "")."""
    result = runner.invoke(app, ["keys", "create", "--owner", owner, "--role", "user"], env=env)
    assert result.exit_code == 2, result.output
    assert "owner must be 1 to 255 characters" in result.stderr
    assert not KEY_RE.search(result.stdout)
    listed = runner.invoke(app, ["keys", "list", "--json"], env=env)
    assert json.loads(listed.stdout)["api_keys"] == []


def test_keys_revoke(runner: CliRunner, env: dict[str, str]) -> None:
    """`keys revoke ID` stops a key; revoking it again fails."""
    created = runner.invoke(app, ["keys", "create", "--owner", "o", "--role", "user"], env=env)
    key = created.stdout.strip().splitlines()[-1]
    key_id = json.loads(runner.invoke(app, ["keys", "list", "--json"], env=env).stdout)["api_keys"][
        0
    ]["id"]
    assert runner.invoke(app, ["keys", "revoke", key_id], env=env).exit_code == 0
    with pytest.raises(Unauthenticated):
        verify(env["JOBGATE_DATA_DIR"], key)
    assert runner.invoke(app, ["keys", "revoke", key_id], env=env).exit_code == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps=5", ("steps", 5)),
        ("name=alice", ("name", "alice")),
        ("flag=true", ("flag", True)),
        ("nothing=null", ("nothing", None)),
        ('obj={"a": [1]}', ("obj", {"a": [1]})),
        ("eq=a=b", ("eq", "a=b")),
        ("empty=", ("empty", "")),
        # Not JSON, though Python's json reads them: kept as the strings they are.
        ("x=NaN", ("x", "NaN")),
        ("x=-Infinity", ("x", "-Infinity")),
        ("big=1e400", ("big", "1e400")),
        ('obj={"a": Infinity}', ("obj", '{"a": Infinity}')),
    ],
)
def test_param_values_are_json_when_they_parse(text: str, expected: tuple[str, object]) -> None:
    """`--param k=v`: v as JSON when it parses, else the string."""
    assert parse_param(text) == expected


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": 1e400}', '{"a": [Infinity]}'])
def test_params_json_that_is_not_json_is_a_usage_error(runner: CliRunner, text: str) -> None:
    """`--params-json` with NaN, Infinity or an out-of-range number: exit 2 with the
    reason, not a traceback from deep in the HTTP client."""
    result = runner.invoke(
        app, ["submit", "steps", "--params-json", text, "--url", "http://127.0.0.1:9", "--key", "k"]
    )
    assert result.exit_code == 2, result.output
    assert "not JSON" in result.stderr
    assert "Traceback" not in result.output


def test_submit_without_a_server_fails_cleanly(runner: CliRunner) -> None:
    """An unreachable server is a one-line error and exit code 1, not a traceback."""
    result = runner.invoke(
        app, ["submit", "steps", "--param", "steps=1", "--url", "http://127.0.0.1:9", "--key", "k"]
    )
    assert result.exit_code == 1
    assert "cannot reach" in result.stderr


def test_a_local_file_error_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An output path that cannot be written (`-o hidden/` where `hidden` is a file, a
    name too long, `/proc/`) ends the command with `error: ...` and exit 1 (regression:
    a traceback)."""
    with pytest.raises(typer.Exit) as ended, connected("http://127.0.0.1:9", "k"):
        raise FileExistsError(17, "File exists", "hidden")
    assert ended.value.exit_code == 1
    captured = capsys.readouterr()
    assert "error: File exists: hidden" in captured.err
    assert "Traceback" not in captured.err
