"""Upgrades with automatic rollback, on a real PM2-managed node service and a real PostgreSQL database.

The customer starts at 2.4.0 in plain folders (backend under PM2, store static); release 2.5 brings a
migrate hook that changes the schema, a build hook, new .env keys. Failures are injected per customer with
a BREAK key in its .env (tests/upgrade_fixtures.py), the way a broken release fails.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

import pytest
from django.conf import settings

from engines import ecosystem, envfile, layout, zipunpack
from tests.conftest import free_port
from tests.restore_helpers import pg_databases_like, pg_exec, pg_state, tree_state

# --- pure engines (no server) -------------------------------------------------------------------------------


@pytest.mark.smoke
def test_first_switch_keeps_the_plain_folder_as_the_previous_release_and_undo_puts_it_back(tmp_path):
    root = tmp_path / "root"
    (root / "backend").mkdir(parents=True)
    (root / "backend" / "a.txt").write_text("old")
    new = layout.release_dir(root, "2.5.0", "backend")
    new.mkdir(parents=True)
    (new / "a.txt").write_text("new")
    before = tree_state(root)
    step = layout.plan_switch(root, root / "backend", new, component="backend", previous_version="2.4.0")
    layout.apply_switch(step, root=root)
    assert os.readlink(root / "backend") == "releases/2.5.0/backend"
    assert (root / "backend" / "a.txt").read_text() == "new"
    assert (root / "releases" / "2.4.0" / "backend" / "a.txt").read_text() == "old"
    assert layout.live_state(root, root / "backend").version == "2.5.0"
    json.dumps(step)  # a journal step is plain JSON
    assert layout.undo_switch(step, root=root) and not layout.undo_switch(step, root=root)  # idempotent
    (root / "releases" / "2.4.0").rmdir()
    assert tree_state(root) == before


@pytest.mark.smoke
def test_switch_between_releases_replaces_the_link_and_undo_restores_it(tmp_path):
    root = tmp_path / "root"
    a, b = layout.release_dir(root, "1.0.0", "web"), layout.release_dir(root, "1.1.0", "web")
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    layout.point(root, root / "web", "releases/1.0.0/web")
    step = layout.plan_switch(root, root / "web", b, component="web", previous_version="1.0.0")
    assert step["before"] == {"kind": "link", "target": "releases/1.0.0/web", "version": "1.0.0"}
    layout.apply_switch(step, root=root)
    assert os.readlink(root / "web") == "releases/1.1.0/web"
    layout.undo_switch(step, root=root)
    assert os.readlink(root / "web") == "releases/1.0.0/web"
    gone = layout.plan_switch(root, root / "web", None, component="web", previous_version="1.0.0")
    layout.apply_switch(gone, root=root)
    assert not os.path.lexists(root / "web")
    layout.undo_switch(gone, root=root)
    assert os.readlink(root / "web") == "releases/1.0.0/web"


@pytest.mark.smoke
def test_prune_plan_keeps_n_most_recent_and_never_the_protected_ones():
    present = ["2.3.0", "2.4.0", "2.5.0", "2.6.0", "unversioned"]
    order = ["2.6.0", "2.5.0", "2.4.0"]  # most recently live first
    assert layout.prune_plan(present, order=order, keep=1, protect={"2.6.0"}) == ["2.3.0", "2.4.0", "unversioned"]
    # keep=0 and the rollback target protected: only it and the live one stay
    assert layout.prune_plan(present, order=order, keep=0, protect={"2.6.0", "2.5.0"}) == \
        ["2.3.0", "2.4.0", "unversioned"]
    assert layout.prune_plan(present, order=order, keep=3, protect={"2.6.0", "2.5.0"}) == []


@pytest.mark.smoke
def test_env_merge_keeps_every_value_adds_new_keys_and_reports_removed_ones():
    live = "# mine\nPORT=8080\nAPI_SECRET='x y'\nOLD=1"
    example = "PORT=\nAPI_SECRET=\nNEW_FLAG=\"on\"\nTOKEN=\n"
    merged = layout.merge_env(live, example)
    assert merged.text.startswith(live + "\n")  # the live file, line for line
    assert envfile.parse(merged.text) == {"PORT": "8080", "API_SECRET": "x y", "OLD": "1", "NEW_FLAG": "on",
                                          "TOKEN": ""}
    assert merged.added == {"NEW_FLAG": "on", "TOKEN": ""}
    assert merged.removed == ["OLD"]  # reported, kept
    assert merged.missing_required == ["TOKEN"]  # empty in the example = required
    assert layout.merge_env(live, None).text == live


@pytest.mark.smoke
def test_staging_refuses_a_member_leaving_the_folder_and_leaves_nothing(tmp_path):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("web/ok.txt", "ok")
        info = zipfile.ZipInfo("web/link")
        info.create_system = 3
        info.external_attr = (0o120777) << 16
        zf.writestr(info, "../../etc")
    dest = tmp_path / "releases" / "1.0.0" / "web"
    dest.parent.mkdir(parents=True)
    with pytest.raises(layout.LayoutError, match="leads outside the component folder"):
        zipunpack.stage_zip(z, tmp_path, dest, root_folder="web", tag="t")
    assert list(dest.parent.iterdir()) == []


def _unix_member(zf: zipfile.ZipFile, name: str, mode: int, data: str = "") -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: external_attr holds the type and mode
    info.external_attr = mode << 16
    zf.writestr(info, data)


@pytest.mark.smoke
def test_staging_gives_the_release_folder_to_the_customer_user_without_setid_bits(tmp_path, customer_users):
    from engines import runas

    owner = runas.lookup(customer_users[0])
    z = tmp_path / "web.zip"
    with zipfile.ZipFile(z, "w") as zf:
        _unix_member(zf, "web/", 0o40755)
        _unix_member(zf, "web/bin/", 0o42775)
        _unix_member(zf, "web/bin/su", 0o104755, "#!/bin/sh\n")
        _unix_member(zf, "web/bin/tool", 0o100750, "tool")
        dos = zipfile.ZipInfo("web/deep/er/index.html")
        dos.create_system = 0  # written on Windows: no Unix mode, so 0644; its folders are made on the way
        zf.writestr(dos, "<h1>hi</h1>")
        _unix_member(zf, "web/current", 0o120777, "deep/er")
    root = tmp_path / "root"
    root.mkdir()
    dest = layout.release_dir(root, "1.0.0", "web")

    staged = zipunpack.stage_zip(z, root, dest, root_folder="web", tag="t", owner=owner)

    assert staged.files == 3 and staged.setid == [("web/bin/", 0o42775), ("web/bin/su", 0o104755)]
    entries = [dest, *dest.rglob("*")]
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in entries} == {(owner.uid, owner.gid)}
    modes = {str(p.relative_to(dest)): oct(p.lstat().st_mode & 0o7777) for p in entries if not p.is_symlink()}
    assert modes == {".": "0o755", "bin": "0o755", "bin/su": "0o755", "bin/tool": "0o750", "deep": "0o755",
                     "deep/er": "0o755", "deep/er/index.html": "0o644"}
    assert (dest / "current" / "index.html").read_text() == "<h1>hi</h1>"
    for folder in (root / "releases", root / "releases" / "1.0.0"):  # the worker's, traversable by the customer
        assert (folder.stat().st_uid, folder.stat().st_mode & 0o777) == (os.geteuid(), 0o755)
    assert os.listdir(dest.parent) == ["web"]


@pytest.mark.smoke
def test_staging_refuses_a_releases_folder_that_is_a_link_and_writes_nothing_there(tmp_path):
    z = tmp_path / "web.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("web/index.html", "x")
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "releases").symlink_to(elsewhere)
    with pytest.raises(layout.LayoutError, match="releases is not a folder"):
        zipunpack.stage_zip(z, root, layout.release_dir(root, "1.0.0", "web"), root_folder="web", tag="t")
    assert os.listdir(elsewhere) == []


@pytest.mark.smoke
def test_staging_refuses_a_member_written_through_a_link_and_leaves_nothing(tmp_path):
    z = tmp_path / "web.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("web/d/f", "x")
        _unix_member(zf, "web/l", 0o120777, "d")
        zf.writestr("web/l/g", "through the link")
    dest = tmp_path / "releases" / "1.0.0" / "web"
    with pytest.raises(layout.LayoutError, match="'web/l/g' would be written through the symlink 'web/l'"):
        zipunpack.stage_zip(z, tmp_path, dest, root_folder="web", tag="t")
    assert os.listdir(dest.parent) == []


@pytest.mark.smoke
def test_ecosystem_app_comes_from_the_start_command_or_package_json(tmp_path):
    (tmp_path / "package.json").write_text(json.dumps({"scripts": {"start": "node srv.js --fast"}}))
    (tmp_path / "srv.js").write_text("")
    app = ecosystem.app("web", cwd="/c/web", folder=tmp_path, env={"PORT": "1"})
    assert (app["script"], app["args"], app["env"]) == ("/c/web/srv.js", ["--fast"], {"PORT": "1"})
    assert ecosystem.app("web", cwd="/c/web", folder=tmp_path, start_command=["python3", "-m", "http.server"])[
        "interpreter"] == "none"
    (tmp_path / "package.json").unlink()
    with pytest.raises(ecosystem.EcosystemError, match="cannot tell how to start"):
        ecosystem.script_for(tmp_path)
    eco = tmp_path / ecosystem.FILE_NAME
    ecosystem.write(eco, [app])
    assert ecosystem.read_apps(eco) == [app] and (eco.stat().st_mode & 0o777) == 0o600


# --- with PM2 and PostgreSQL ---------------------------------------------------------------------------------
@pytest.fixture
def fast_health(settings):
    settings.KASA_HEALTH_STREAK = 2
    settings.KASA_HEALTH_INTERVAL = 0.2
    settings.KASA_HEALTH_TIMEOUT = 6
    return settings


@pytest.fixture
def releases(transactional_db, tmp_path):
    from tests.upgrade_fixtures import sync_releases

    return sync_releases(tmp_path)


@pytest.fixture
def customer_factory(transactional_db, team, pg_database, fast_health):
    """make(extra_env=...) -> a running customer at 2.4.0; its PM2 app and side databases are removed after."""
    from engines import procman
    from tests.conftest import require
    from tests.upgrade_fixtures import make_running_customer, seed_database, stop_app

    require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    seed_database(pg_database)
    made = []

    def make(extra_env: str = "", *, createdb: bool = True, versions=None):
        if createdb:
            pg_exec(pg_database, f'ALTER ROLE "{pg_database["user"]}" CREATEDB', dbname="postgres")
        root = Path(settings.KASA_CUSTOMERS_ROOT) / f"u-{os.urandom(4).hex()}"
        customer = make_running_customer(team, root, pg_database, extra_env=extra_env, versions=versions)
        made.append(customer)
        return customer

    yield make
    for c in made:
        stop_app(c)
        shutil.rmtree(c.root, ignore_errors=True)
    for name in pg_databases_like(pg_database, pg_database["name"] + "__kasa_%"):
        pg_exec(pg_database, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', dbname="postgres")


def _get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return resp.read().decode()


def _cli(*args) -> tuple[int, dict]:
    from django.core.management import CommandError, call_command

    out = io.StringIO()
    try:
        call_command(*args, "--json", stdout=out, stderr=io.StringIO())
        code = 0
    except CommandError as exc:
        code = exc.returncode
    text = out.getvalue().strip()
    return code, (json.loads(text) if text else {})


def _snapshot(customer, pg) -> dict:
    root = customer.root_path()
    return {"tree": tree_state(root), "env": (root / "backend" / ".env").read_bytes(), "pg": pg_state(pg)}


def test_upgrade_serves_the_new_release_merges_env_records_versions_and_is_healthy(customer_factory, releases,
                                                                                     pg_database):
    from customers.models import Customer
    from upgrades.models import Upgrade

    customer = customer_factory()
    root = customer.root_path()
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"
    live_env = (root / "backend" / ".env").read_text()
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 0, doc
    assert doc["status"] == "succeeded" and doc["from"] == {"backend": "2.4.0", "store": "2.4.0"}
    assert doc["to"] == {"backend": "2.5.0", "store": "2.5.0"}
    assert [s["name"] for s in doc["steps"]] == ["preflight", "backup", "stage", "env", "migrate", "build", "stop",
                                                 "switch", "start", "health", "record", "cleanup"]
    assert all(s["status"] == "succeeded" and s["started_at"] and s["finished_at"] for s in doc["steps"])
    # new files served, through the switched symlink; the original folder kept as the previous release
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.5.0"
    assert os.readlink(root / "backend") == "releases/2.5.0/backend"
    assert os.readlink(root / "store") == "releases/2.5.0/store"
    assert (root / "store" / "index.html").read_text() == "<h1>store 2.5.0</h1>\n"
    assert (root / "releases" / "2.4.0" / "backend" / ".env").read_text() == live_env
    assert (root / "backend" / "dist" / "index.html").exists()  # the build hook ran in the staged folder
    # .env merged: every value kept (OLD_SETTING too, though 2.5.0 no longer lists it), EXPORT_DIR added
    merged = (root / "backend" / ".env").read_text()
    assert merged.startswith(live_env) and "EXPORT_DIR=exports" in merged
    assert (root / "backend" / ".env").stat().st_mode & 0o777 == 0o600
    seen = json.loads(_get(f"http://127.0.0.1:{customer.port}/env"))
    assert seen["EXPORT_DIR"] == "exports" and seen["OLD_SETTING"] == "1"
    up = Upgrade.objects.get(pk=doc["id"])
    assert up.env_diff["backend"]["added"] == ["EXPORT_DIR"]
    assert up.env_diff["backend"]["removed_from_example"] == ["OLD_SETTING"]
    assert "s3cr3t" not in json.dumps(up.env_diff) and "s3cr3t" not in json.dumps(up.preflight)
    # the migration ran against the real database; versions recorded; the pre-upgrade backup is pinned
    assert "public.exports" in pg_state(pg_database)
    assert Customer.objects.get(pk=customer.pk).versions == {"backend": "2.5.0", "store": "2.5.0"}
    assert up.backup.pinned and up.backup.trigger == "upgrade" and up.backup.status == "succeeded"
    assert not up.run.error and up.run.status == "succeeded"


@pytest.mark.parametrize("step", ["migrate", "build", "start", "health"])
def test_a_failure_after_the_backup_puts_files_env_and_every_table_back(customer_factory, releases, pg_database,
                                                                         settings, step):
    from customers.models import Customer
    from upgrades.models import BadRelease, Upgrade

    settings.KASA_HEALTH_TIMEOUT = 3  # the broken release's /health answers 500 until this gives up
    customer = customer_factory(f"BREAK={step}@2.5.0\n")
    before = _snapshot(customer, pg_database)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 1, doc
    assert doc["status"] == "rolled_back", doc["error"]
    names = [s["name"] for s in doc["steps"]]
    failed = [s["name"] for s in doc["steps"] if s["status"] == "failed"]
    assert failed == [step], doc["steps"]
    assert names[-7:] == ["rollback: stop", "rollback: switch", "rollback: database", "rollback: env",
                          "rollback: start", "rollback: health", "rollback: cleanup"]
    assert all(s["status"] == "succeeded" for s in doc["steps"][names.index("rollback: stop"):])
    # files (modes and links included), the .env byte for byte and every table: as before
    assert _snapshot(customer, pg_database) == before
    assert not (customer.root_path() / "releases").exists()
    assert pg_databases_like(pg_database, pg_database["name"] + "__kasa_%") == []
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"
    assert _get(f"http://127.0.0.1:{customer.port}/health") == "ok"
    assert Customer.objects.get(pk=customer.pk).versions == {"backend": "2.4.0", "store": "2.4.0"}
    up = Upgrade.objects.get(pk=doc["id"])
    assert up.run.status == "failed" and "rolled back" in up.run.error
    assert f"failed at {step}" in up.error
    assert BadRelease.objects.filter(customer=customer, release=releases["2.5"]).exists()


def test_a_rolled_back_release_is_not_offered_again_unless_forced(customer_factory, releases):
    from upgrades.models import BadRelease, Upgrade
    from upgrades.selectors import releases_offered
    from upgrades.services import UpgradeInputError, upgrade_preflight, upgrade_start

    customer = customer_factory()
    rel = releases["2.5"]
    assert [o["allowed"] for o in releases_offered(customer) if o["release"] == rel] == [True]
    BadRelease.objects.create(customer=customer, release=rel, reason="health check failed at 10:00")
    assert rel not in [o["release"] for o in releases_offered(customer)]
    assert [(o["allowed"], o["bad"]) for o in releases_offered(customer, include_bad=True)
            if o["release"] == rel] == [(False, "health check failed at 10:00")]
    with pytest.raises(UpgradeInputError, match="failed for .* before .*force it"):
        upgrade_start(customer, rel, via="cli", enqueue=False)
    assert not Upgrade.objects.exists()
    report = upgrade_preflight(customer, rel)
    assert not report.ok and "offered again only when forced" in report.problems()[0]
    assert upgrade_preflight(customer, rel, force=True).ok
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5", "--dry-run", "--force")
    assert code == 0 and doc["status"] == "succeeded" and doc["dry_run"] and doc["force"], doc


def test_dry_run_json_runs_the_preflight_only_and_exit_codes_follow_the_status(customer_factory, releases):
    from upgrades.models import Upgrade

    customer = customer_factory()
    root = customer.root_path()
    before = tree_state(root)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5", "--dry-run")
    assert code == 0, doc
    assert (doc["status"], doc["dry_run"], [s["name"] for s in doc["steps"]]) == ("succeeded", True, ["preflight"])
    assert {c["name"] for c in doc["preflight"]["checks"]} >= {"release", "services", "env", "disk", "health",
                                                                "exclusive", "backup"}
    assert doc["from"] == {"backend": "2.4.0", "store": "2.4.0"} and doc["to"] == {"backend": "2.5.0",
                                                                                   "store": "2.5.0"}
    assert tree_state(root) == before and not Upgrade.objects.get(pk=doc["id"]).backup_id
    # nothing to roll back: a dry run is not an upgrade
    assert _cli("rollback", customer.domain)[0] == 2
    # unknown release / customer: bad input
    assert _cli("upgrade", customer.domain, "--to", "9.9", "--dry-run")[0] == 2
    assert _cli("upgrade", "nobody.example.com", "--to", "2.5")[0] == 2
    # a required key without a value: the preflight fails, nothing changes, exit 1
    env = root / "backend" / ".env"
    env.write_text(env.read_text().replace("API_SECRET=", "API_SECRET=\nX="))
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 1 and doc["status"] == "failed", doc
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [("preflight", "failed")]
    assert "API_SECRET" in doc["error"] and "nothing was touched" in doc["error"]
    # the current release is not an upgrade
    env.write_text(env.read_text().replace("API_SECRET=\nX=", "API_SECRET="))
    code, doc = _cli("upgrade", customer.domain, "--to", "2.4", "--dry-run")
    assert code == 1 and "already installed" in doc["error"], doc


def test_manual_rollback_puts_back_the_previous_release_and_the_database(customer_factory, releases, pg_database):
    from customers.models import Customer
    from upgrades.models import BadRelease, Upgrade

    customer = customer_factory()
    root = customer.root_path()
    before = _snapshot(customer, pg_database)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 0, doc
    (root / "backend" / ".env").write_text((root / "backend" / ".env").read_text() + "SET_AFTER=1\n")
    code, rb = _cli("rollback", customer.domain)
    assert code == 0, rb
    assert rb["kind"] == "rollback" and rb["status"] == "succeeded" and rb["rolls_back"] == doc["id"]
    assert [s["name"] for s in rb["steps"]] == ["preflight", "backup", "stop", "switch", "database", "env", "start",
                                                "health", "record", "cleanup"]
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"
    assert os.readlink(root / "backend") == "releases/2.4.0/backend"  # the kept original folder, linked
    assert (root / "backend" / ".env").read_bytes() == before["env"]
    assert pg_state(pg_database) == before["pg"]
    assert pg_databases_like(pg_database, pg_database["name"] + "__kasa_%") == []
    assert Customer.objects.get(pk=customer.pk).versions == {"backend": "2.4.0", "store": "2.4.0"}
    rollback = Upgrade.objects.get(pk=rb["id"])
    assert rollback.backup.pinned and "SET_AFTER" in json.dumps(rollback.env_diff)
    assert BadRelease.objects.filter(customer=customer, release=releases["2.5"]).exists()
    assert _cli("rollback", customer.domain)[0] == 2  # the last upgrade is rolled back already


def test_when_the_rollback_fails_the_upgrade_is_quarantined_nothing_is_deleted_and_an_alert_goes_out(
        customer_factory, releases, pg_database, settings, mailoutbox, monkeypatch):
    import psycopg

    from backups.models import Backup
    from engines import dbrestore_pginplace
    from upgrades.models import Upgrade
    from upgrades.services import quarantine_resolve, upgrade_preflight

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.ADMINS = [("Ops", "ops@example.com")]
    # The role cannot create databases, so the rollback restores in place, in one transaction; another
    # role's session holds a lock on one of its tables all along: the backup works (it only reads), the
    # migration runs, the build fails, and the rollback's transaction gives up on the lock and rolls back.
    customer = customer_factory("BREAK=build@2.5.0\n", createdb=False)
    root = customer.root_path()
    pg_exec(pg_database, "CREATE TABLE side (x int)", as_owner=True)
    monkeypatch.setattr(dbrestore_pginplace, "LOCK_TIMEOUT_SECONDS", 1)
    with psycopg.connect(host=pg_database["host"], port=pg_database["port"], user="postgres",
                         dbname=pg_database["name"]) as holder:
        holder.execute("LOCK TABLE side IN ACCESS SHARE MODE")
        code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 1 and doc["status"] == "quarantined", doc
    check = [c for c in doc["preflight"]["checks"] if c["name"] == "rollback of database main"]
    assert check and check[0]["ok"] and "in one transaction" in check[0]["detail"]
    statuses = {s["name"]: s["status"] for s in doc["steps"]}
    assert statuses["build"] == "failed" and statuses["rollback: database"] == "failed"
    assert "rollback: start" not in statuses and "rollback: cleanup" not in statuses  # it stopped there
    assert "ROLLBACK FAILED" in doc["error"] and "nothing was deleted" in doc["error"]
    # nothing deleted: the staged release, the original folder (back in place), the pinned backup, the
    # migrated database as it is
    assert (root / "releases" / "2.5.0" / "backend" / "server.js").exists()
    assert (root / "backend" / "server.js").exists() and not (root / "backend").is_symlink()
    bk = Backup.objects.get(pk=doc["backup"])
    assert bk.status == "succeeded" and bk.pinned and Path(bk.target.path, bk.prefix).is_dir()
    assert "public.exports" in pg_state(pg_database)
    up = Upgrade.objects.get(pk=doc["id"])
    assert "journal" in up.run.result and up.run.result["rollback_error"]
    # the alert
    assert len(mailoutbox) == 1 and "QUARANTINED" in mailoutbox[0].subject
    assert customer.domain in mailoutbox[0].body and "Nothing was deleted" in mailoutbox[0].body
    assert pg_database["password"] not in mailoutbox[0].body
    # no further upgrade until an operator resolves it
    assert any("quarantined" in p for p in upgrade_preflight(customer, releases["2.5"], force=True).problems())
    quarantine_resolve(up, note="restored the database by hand")
    assert not any("quarantined" in p for p in upgrade_preflight(customer, releases["2.5"], force=True).problems())


def test_keep_n_prunes_old_releases_but_never_the_rollback_target(customer_factory, releases, settings):
    settings.KASA_KEEP_RELEASES = 0
    customer = customer_factory()
    root = customer.root_path()
    assert _cli("upgrade", customer.domain, "--to", "2.5")[0] == 0
    # keep 0: still the live 2.5.0 and the way back (the original folder, kept as 2.4.0)
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["2.4.0", "2.5.0"]
    code, doc = _cli("upgrade", customer.domain, "--to", "2.6")
    assert code == 0, doc
    assert doc["to"] == {"backend": "2.6.0"}  # the store stays at 2.5.0
    assert not (root / "releases" / "2.4.0").exists()
    assert (root / "releases" / "2.5.0" / "backend").is_dir() and (root / "releases" / "2.6.0" / "backend").is_dir()
    assert os.readlink(root / "store") == "releases/2.5.0/store"
    # the kept rollback target is usable
    code, rb = _cli("rollback", customer.domain)
    assert code == 0, rb
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.5.0"


def test_a_backup_taken_after_an_upgrade_restores_onto_the_symlinked_layout(customer_factory, releases,
                                                                           pg_database):
    """Service.folder() resolves the symlink: the backup archives releases/<version>/<component> and records that
    path, so the restore swaps the release folder itself and the service path stays a link to it."""
    from backups.models import BackupArtifact
    from tests.restore_helpers import command_json

    customer = customer_factory()
    root = customer.root_path()
    assert _cli("upgrade", customer.domain, "--to", "2.5")[0] == 0
    code, bk = command_json("backup", customer.domain)
    assert code == 0, bk
    paths = {a.source: a.details.get("path") for a in BackupArtifact.objects.filter(backup_id=bk["id"])}
    assert paths["backend"] == "releases/2.5.0/backend" and paths["store"] == "releases/2.5.0/store"
    before = _snapshot(customer, pg_database)
    (root / "backend" / "server.js").write_text("broken\n")  # written through the link, into the release
    (root / "backend" / ".env").write_text("PORT=1\n")
    pg_exec(pg_database, "DELETE FROM exports")
    code, run = command_json("restore", str(bk["id"]), "--yes")
    assert code == 0, run
    assert _snapshot(customer, pg_database) == before
    assert os.readlink(root / "backend") == "releases/2.5.0/backend"
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.5.0"


def test_restores_across_an_upgrade_bring_back_the_layout_and_the_versions(customer_factory, releases,
                                                                          pg_database):
    """The pinned pre-upgrade backup puts the plain 2.4.0 folders back (and versions 2.4.0); a backup taken
    after the upgrade then points the service path at releases/2.5.0 again (and versions 2.5.0)."""
    from tests.restore_helpers import command_json
    from upgrades.models import Upgrade

    customer = customer_factory()
    root = customer.root_path()
    assert _cli("upgrade", customer.domain, "--to", "2.5")[0] == 0
    pre = Upgrade.objects.get(customer=customer, kind="upgrade").backup_id
    code, post = command_json("backup", customer.domain)
    assert code == 0, post

    code, run = command_json("restore", str(pre), "--yes", "--no-safety-backup")
    assert code == 0, run
    customer.refresh_from_db()
    assert not os.path.islink(root / "backend") and customer.versions["backend"] == "2.4.0"
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"

    code, run = command_json("restore", str(post["id"]), "--yes", "--no-safety-backup")
    assert code == 0, run
    customer.refresh_from_db()
    assert os.readlink(root / "backend") == "releases/2.5.0/backend" and customer.versions["backend"] == "2.5.0"
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.5.0"
    assert not [p for p in os.listdir(root) if ".kasa-link-" in p]


def test_install_puts_a_first_release_in_place_from_nothing(customer_factory, releases, pg_database):
    """From nothing: the backend under PM2 and, to cover the plain start/stop manager too, the store served by
    `python -m http.server` under the "command" process manager."""
    import sys

    from backups.models import Backup
    from customers import runtime
    from customers.models import Customer, Service
    from engines import procman

    customer = customer_factory(versions={})
    root = customer.root_path()
    store_port = free_port()
    Service.objects.filter(customer=customer, name="store").update(
        process_manager="command", start_command=[sys.executable, "-m", "http.server", str(store_port), "--bind",
                                                  "127.0.0.1"], health_url=f"http://127.0.0.1:{store_port}/VERSION")
    own_env = (root / "backend" / ".env").read_text()
    try:
        code, doc = _cli("upgrade", customer.domain, "--to", "2.4")
        assert _get(f"http://127.0.0.1:{store_port}/index.html") == "<h1>store 2.4.0</h1>\n"
    finally:
        procman.CommandManager(str(settings.KASA_VAR_DIR / "services")).stop(procman.ServiceSpec(
            name="store", folder=str(root / "store"), manager="command", state_dir=str(runtime.state_dir(customer))))
    assert code == 0, doc
    assert doc["kind"] == "install" and doc["from"] == {} and doc["to"] == {"backend": "2.4.0", "store": "2.4.0"}
    # no backup of files that are not there; the database is backed up (a failed migrate could be undone)
    assert Backup.objects.get(pk=doc["backup"]).scope == "database"
    assert os.readlink(root / "backend") == "releases/2.4.0/backend"
    assert os.readlink(root / "store") == "releases/2.4.0/store"
    assert (root / "releases" / "unversioned" / "backend" / ".env").read_text() == own_env  # kept aside
    assert envfile.read(root / "backend" / ".env")["API_SECRET"] == "install-1"
    assert (root / ecosystem.FILE_NAME).exists()
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"
    assert Customer.objects.get(pk=customer.pk).versions == {"backend": "2.4.0", "store": "2.4.0"}


def test_a_worker_killed_mid_upgrade_is_rolled_back_by_the_reaper(customer_factory, releases, pg_database,
                                                                  start_worker):
    import signal

    from operations.services import runs_reap
    from tests.conftest import wait_dead, wait_until
    from upgrades.models import Upgrade, UpgradeStep
    from upgrades.services import upgrade_start

    customer = customer_factory("BREAK=hang@2.5.0\n")
    before = _snapshot(customer, pg_database)
    run = upgrade_start(customer, releases["2.5"], via="cli")
    worker = start_worker()
    try:
        wait_until(lambda: UpgradeStep.objects.filter(upgrade__run=run, name="migrate").exists()
                   and "hanging" in "".join(run.log_lines.values_list("text", flat=True)), 60,
                   what="the migrate hook to hang")
    finally:
        worker.stop(signal.SIGKILL)
        _kill_processes_in(customer.root_path())  # the hung hook: its own session, so it outlived the worker
    run.refresh_from_db()
    wait_dead(int(run.worker.rsplit(":", 1)[1]))  # the task's process, not only qcluster
    assert "public.exports" in pg_state(pg_database)  # the migration changed the schema before the kill
    assert runs_reap() == [run.pk]
    up = Upgrade.objects.get(run=run)
    assert up.status == "rolled_back", up.error
    assert "failed at migrate: the worker died" in up.error
    assert up.steps.get(name="migrate").status == "failed"
    assert up.steps.get(name="rollback: database").status == "succeeded"
    assert _snapshot(customer, pg_database) == before
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"


def _kill_processes_in(root: Path) -> None:
    import signal

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(root) + "/") and "migrate.py" in (proc / "cmdline").read_bytes().decode(errors="replace"):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_failed_install_leaves_the_folders_and_the_database_as_they_were(customer_factory, releases, pg_database):
    customer = customer_factory(versions={})
    env = customer.root_path() / "backend" / ".env"
    env.write_text(env.read_text() + "BREAK=build@2.4.0\n")
    before = _snapshot(customer, pg_database)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.4")
    assert code == 1 and doc["status"] == "rolled_back", doc
    statuses = {s["name"]: s["status"] for s in doc["steps"]}
    assert statuses["build"] == "failed" and statuses["rollback: database"] == "succeeded"
    assert statuses["rollback: start"] == "skipped"  # nothing ran before an install
    assert _snapshot(customer, pg_database) == before
    assert not (customer.root_path() / "store").exists()


def test_a_failed_backup_fails_the_upgrade_and_touches_nothing(customer_factory, releases, pg_database, tmp_path):
    from backups.models import StorageTarget
    from backups.services import global_policy
    from upgrades.models import BadRelease

    customer = customer_factory()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("the backup target's path is a file: every write fails")
    policy = global_policy()
    policy.target = StorageTarget.objects.create(name="broken", kind="local", path=str(blocker))
    policy.save()
    before = _snapshot(customer, pg_database)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 1 and doc["status"] == "failed", doc
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [("preflight", "succeeded"), ("backup", "failed")]
    assert "nothing was touched" in doc["error"]
    assert _snapshot(customer, pg_database) == before
    assert not BadRelease.objects.exists()  # the release did not fail: the backup did
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"
