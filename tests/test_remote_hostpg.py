"""Issue 14: a host set to its own database client tools (Host.db_client_tools "host") has its PostgreSQL dumped by
its own pg_dump, run there (backups.remote_hostpg, engines.hostpgtools): the snapshot and row counts still taken by
the worker through the forward, the password handed over on stdin (never in an argv), the dump drilled with Kasa's
pg_restore. A host without a usable pg_dump fails the backup naming it.

Real parts: the simulated hosts of tests/hosts.py (sshd in a network namespace) and the host-only PostgreSQL of
tests/remote_fixtures.py. The host's "own" pg_dump is the embedded 18 (its server's version) behind a small
wrapper on the host that looks at every process's argv on the machine while it runs, then becomes pg_dump."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from backups.models import Backup
from engines import sources
from operations.models import RunLogLine
from tests.remote_fixtures import make_host, remote_customer, run_backup, run_verify

pytestmark = pytest.mark.django_db(transaction=True)


def _host_tools(host):
    host.db_client_tools = host.DbTools.HOST
    host.save(update_fields=["db_client_tools"])
    return host


def _watching_pg_dump(folder: Path, seen: Path) -> None:
    """A pg_dump on the host that records, when it dumps, every argv on the machine (the simulated host shares its
    process table with the worker), its own arguments and where its password file is; then execs the real one."""
    real = os.path.join(sources._embedded_pg_bin(), "pg_dump")
    folder.mkdir()
    script = folder / "pg_dump"
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/python3 -I
        import glob, json, os, sys
        if sys.argv[1:] != ["--version"]:
            argvs = []
            for f in glob.glob("/proc/[0-9]*/cmdline"):
                try:
                    argvs.append(open(f, "rb").read().replace(b"\\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
            pf = os.environ.get("PGPASSFILE", "")
            json.dump({{"argvs": argvs, "args": sys.argv[1:], "passfile": pf,
                       "dir_mode": os.stat(os.path.dirname(pf)).st_mode & 0o777,
                       "file_mode": os.stat(pf).st_mode & 0o777,
                       "pgpassword": os.environ.get("PGPASSWORD")}}, open({str(seen)!r}, "w"))
        os.execv({real!r}, [{real!r}] + sys.argv[1:])
        """))
    script.chmod(0o755)


def test_a_host_set_to_its_own_tools_dumps_postgresql_there_with_its_password_in_no_argv_and_the_dump_drills(
        host_pg, team, settings, tmp_path):
    web, pg = host_pg
    host = _host_tools(make_host(web, "web-ownpg"))
    seen = tmp_path / "seen.json"
    _watching_pg_dump(tmp_path / "bin", seen)
    settings.KASA_REMOTE_PG_BIN = str(tmp_path / "bin")
    customer = remote_customer(web, host, team, databases=[("main", pg["url"])], sqlite=False)

    run = run_backup(customer, scope="database")
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    (art,) = bk.manifest["artifacts"]
    details = art["database"]
    # Dumped on the host by its own pg_dump, counted here in the snapshot that pg_dump read.
    assert details["client_host"] == "web-ownpg"
    assert details["client_version"] == sources.pg_tools()[0][2]  # the wrapper's real pg_dump 18 answered
    assert details["row_counts"] == {"public.orders": 123, "shop.items": 0}
    watched = json.loads(seen.read_text())
    assert "--snapshot" in watched["args"] and watched["pgpassword"] is None
    # The password was in a 0600 file of a private 0700 folder, removed once pg_dump ended; in no argv at all.
    assert (watched["dir_mode"], watched["file_mode"]) == (0o700, 0o600)
    assert not os.path.exists(os.path.dirname(watched["passfile"]))
    assert any("--snapshot" in a for a in watched["argvs"])  # pg_dump's own argv among those looked at
    assert not [a for a in watched["argvs"] if pg["password"] in a]
    assert not RunLogLine.objects.filter(run=run, text__contains=pg["password"]).exists()
    assert any("its own pg_dump" in line for line in RunLogLine.objects.filter(run=run).values_list("text", flat=True))

    drill = run_verify(bk)  # Kasa's own pg_restore (18) reads the host's pg_dump 18: rows as in the manifest
    assert drill.status == "succeeded", drill.error
    assert drill.result["checks"] == [{"artifact": "db-main.pgdump.zst.enc", "tables": 2, "rows": 123}]

    # Had the host's pg_dump been newer than every pg_restore here, the drill says so, naming both, before it
    # restores anything.
    newest = sources.pg_tools("pg_restore")[0][0]
    stored = bk.artifacts.get()
    stored.details = {**stored.details, "client_version": f"pg_dump (PostgreSQL) {newest + 1}.0"}
    stored.save(update_fields=["details"])
    drill = run_verify(bk)
    assert drill.status == "failed"
    assert (f"db-main.pgdump.zst.enc cannot be drilled on this worker: it was dumped by host web-ownpg's own "
            f"pg_dump {newest + 1} and Kasa's newest pg_restore on this worker is {newest}") in drill.error


def test_a_host_without_a_usable_pg_dump_fails_its_backups_storing_nothing_and_its_check_naming_it(
        host_pg, netns_hosts, team, settings, tmp_path):
    # A host whose PATH has every program of this machine's but PostgreSQL's dump tools: refused before anything
    # connects.
    bare = tmp_path / "bin-without-pg_dump"
    bare.mkdir()
    for name in os.listdir("/usr/bin"):
        if not name.startswith(("pg_dump", "pg_restore")):
            (bare / name).symlink_to(f"/usr/bin/{name}")
    h = netns_hosts.make(path=f"{bare}:/usr/local/sbin:/usr/local/bin:/usr/sbin")
    host = _host_tools(make_host(h, "web-nopgdump"))
    customer = remote_customer(h, host, team, databases=[("main", "postgresql://shop:pw@127.0.0.1:5999/shop")],
                               sqlite=False)
    run = run_backup(customer, scope="database")
    assert run.status == "failed"
    assert "host web-nopgdump is set to back up PostgreSQL with its own client tools, but it has no usable " \
           "pg_dump on its PATH" in run.error, run.error
    bk = Backup.objects.get(run=run)
    assert bk.status == Backup.Status.FAILED and not Path(bk.target.store().location(bk.prefix)).exists()

    # A host whose pg_dump is older than its server: refused once the server's version is known, naming both.
    web, pg = host_pg
    old = sources.pg_tools()[-1]
    if old[0] >= int(pg["server_version"].split(".")[0]):
        pytest.skip("no pg_dump older than the test server is installed")
    settings.KASA_REMOTE_PG_BIN = os.path.dirname(old[1])
    host = _host_tools(make_host(web, "web-oldpgdump"))
    customer = remote_customer(web, host, team, databases=[("main", pg["url"])], sqlite=False)
    run = run_backup(customer, scope="database")
    assert run.status == "failed"
    expected = f"host web-oldpgdump's own pg_dump {old[0]} ({old[1]}) cannot dump its PostgreSQL "
    assert expected in run.error, run.error
    assert pg["password"] not in run.error
    # The customer's check says so too, before any backup is tried: the pg_dump that matters is the host's.
    from operations.services import run_execute, run_start

    check = run_start(customer, kind="check", via="cli", enqueue=False)
    run_execute(check.pk)
    check.refresh_from_db()
    assert check.status == "failed" and f"database main: {expected}" in check.error, check.error
