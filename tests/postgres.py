"""A throwaway PostgreSQL server for the ledger tests: its own data directory, a free port on 127.0.0.1, trust
authentication on loopback only, removed afterwards.

initdb refuses to run as root, so under root the server runs as the `postgres` OS user (which Debian's package
creates), in a directory that user owns; any other user runs it directly.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.parallel.channel import free_port

_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_postgres_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: on PATH, else Debian's /usr/lib/postgresql/NN/bin (the
    newest)."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []  # Debian links them
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for directory in candidates:
        if all((directory / tool).is_file() for tool in _TOOLS):
            return directory
    return None


def _runner(workdir: Path) -> dict:
    """subprocess keyword arguments that run a tool as the user who can run the server."""
    kwargs: dict = {"cwd": workdir, "check": True, "stdin": subprocess.DEVNULL}
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no `postgres` OS user to run the server as") from None
        os.chown(workdir, user.pw_uid, user.pw_gid)
        kwargs |= {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [],
                   "env": {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LC_ALL": "C"}}
    return kwargs


@contextmanager
def postgres_server(bindir: Path | None = None) -> Iterator[str]:
    """Start a server; yield the URL of its (empty) database `ledger`; stop it and remove its files."""
    bindir = bindir or find_postgres_bin()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl, postgres) found")
    workdir = Path(tempfile.mkdtemp(prefix="moe-pg-"))
    data, log = workdir / "data", workdir / "server.log"
    run = _runner(workdir)
    port = free_port("127.0.0.1")
    started = False
    try:
        with open(os.devnull, "wb") as quiet:
            subprocess.run([bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                            "--locale=C", "--no-sync"], stdout=quiet, stderr=subprocess.PIPE, **run)
            (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
            options = (f"-p {port} -c listen_addresses=127.0.0.1 -k {workdir} -c fsync=off "
                       f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                       # its dynamic shared memory in the data directory, not /dev/shm (which other tests watch)
                       f"-c dynamic_shared_memory_type=mmap")
            try:
                subprocess.run([bindir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"],
                               stdout=quiet, stderr=quiet, **run)
            except subprocess.CalledProcessError:
                raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text() if log.exists() else ''}") from None
            started = True
        yield fresh_database(f"postgresql://postgres@127.0.0.1:{port}/postgres", "ledger")
    finally:
        if started:
            subprocess.run([bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **(run | {"check": False}))
        shutil.rmtree(workdir, ignore_errors=True)


def fresh_database(url: str, name: str | None = None) -> str:
    """A new, empty database on the server at `url` (for a test's own tables); its URL."""
    import asyncio

    import asyncpg

    name = name or f"t_{uuid.uuid4().hex[:16]}"

    async def create() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    asyncio.run(create())
    return url.rsplit("/", 1)[0] + "/" + name
