"""`moe-cluster keys` end to end, on SQLite and on PostgreSQL: create prints the key once, and the other commands
see what it made."""

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.ledger import open_ledger, parse_api_key
from tests.postgres import fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'ledger.db'}"
    return fresh_database(request.getfixturevalue("postgres_url"))


def keys(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["keys", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def spend(db: str, key_id: str, request_id: str, cost: int) -> None:
    async def body():
        ledger = open_ledger(db)
        try:
            await ledger.reserve(key_id, request_id, cost, ttl_s=60)
            await ledger.settle(request_id, 7, 3, cost)
        finally:
            await ledger.close()

    asyncio.run(body())


def test_keys_commands(db, capsys):
    rc, out, err = keys(capsys, "create", "--credits", "2.5", "--name", "alice", "--rpm", "10", "--db", db)
    assert rc == 0, err
    first, key = out.splitlines()
    key_id = re.fullmatch(r"created key ([0-9a-f]{12}) \(name alice, credits 2\.500000, rpm 10, tpm -\)",
                          first).group(1)
    assert parse_api_key(key)[0] == key_id and "shown only now" in err

    rc, out, _ = keys(capsys, "list", "--db", db)
    assert rc == 0 and key not in out
    assert re.search(rf"^{key_id}\s+alice\s+2\.500000\s+10\s+-\s+active\s", out, re.M), out

    assert keys(capsys, "credit", key_id, "1.25", "--db", db)[:2] == (0, f"key {key_id}: balance 3.750000\n")
    spend(db, key_id, "req-a", 1_500_000)
    spend(db, key_id, "req-b", 1)
    rc, out, _ = keys(capsys, "usage", key_id, "--db", db)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["REQUEST_ID", "KEY_ID", "PROMPT", "COMPLETION", "COST", "TIME"]
    assert [line.split()[:5] for line in lines[1:3]] == [["req-b", key_id, "7", "3", "0.000001"],
                                                         ["req-a", key_id, "7", "3", "1.500000"]]
    assert lines[3] == "2 requests, 1.500001 in all"

    rc, out, _ = keys(capsys, "create", "--db", db)
    other = out.split()[2]
    assert rc == 0 and "(name -, credits 0.000000, rpm -, tpm -)" in out
    assert keys(capsys, "usage", other, "--db", db)[1].endswith("0 requests, 0.000000 in all\n")
    assert keys(capsys, "usage", "--db", db, "--limit", "1")[1].splitlines()[1].startswith("req-b")

    assert keys(capsys, "revoke", key_id, "--db", db)[:2] == (0, f"revoked key {key_id}\n")
    out = keys(capsys, "list", "--db", db)[1]
    assert re.search(rf"^{key_id}\s+alice\s+2\.249999\s+10\s+-\s+revoked\s", out, re.M), out
    assert re.search(rf"^{other}\s+-\s+0\.000000\s+-\s+-\s+active\s", out, re.M), out

    rc, _, err = keys(capsys, "revoke", "0123456789ab", "--db", db)
    assert rc == 2 and "no such key: 0123456789ab" in err
    rc, _, err = keys(capsys, "credit", "0123456789ab", "1", "--db", db)
    assert rc == 2 and "no such key" in err
    rc, _, err = keys(capsys, "credit", key_id, "0", "--db", db)
    assert rc == 2 and "must be > 0" in err
    with pytest.raises(SystemExit):
        main(["keys", "credit", key_id, "1.0000001", "--db", db])
    assert "more than 6 decimals" in capsys.readouterr().err


def test_bad_amounts_are_refused_before_any_write(tmp_path, capsys):
    db = str(tmp_path / "ledger.db")
    with pytest.raises(SystemExit):
        main(["keys", "create", "--credits", "1.0000001", "--db", db])
    assert "more than 6 decimals" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["keys", "create", "--credits", "lots", "--db", db])
    assert "not an amount of dollars" in capsys.readouterr().err
    assert not Path(db).exists()


def test_default_db_is_in_the_user_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_CLUSTER_CACHE", str(tmp_path / "cache"))
    rc, out, _ = keys(capsys, "create", "--credits", "1")
    assert rc == 0 and (tmp_path / "cache" / "ledger.db").is_file()
    assert out.split()[2] in keys(capsys, "list")[1]


@pytest.mark.e2e  # a CLI process
def test_console_command(tmp_path):
    db = str(tmp_path / "ledger.db")
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "keys", "create", "--credits", "3", "--db", db],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    key = result.stdout.splitlines()[1]
    listed = subprocess.run([sys.executable, "-m", "cluster.cli", "keys", "list", "--db", db], capture_output=True,
                            text=True, timeout=120)
    assert parse_api_key(key)[0] in listed.stdout and "3.000000" in listed.stdout
