"""Issue 14's foundation: hosts, first contact and trust of a host key, the probe, the CLI, customers on hosts.

Remote hosts are real: a network namespace each with OpenSSH's sshd inside (tests/hosts.py), reached through a
veth pair exactly as a machine on the network would be (cut off by taking the link down)."""

from __future__ import annotations

import io
import json
import os
import time

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from customers.models import Customer
from engines import hostprobe, ssh
from engines.secretbox import Secret
from hosts.models import LOCAL, Host, local_host_pk
from hosts.services import host_probe, parse_ssh_spec

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def remote(netns_hosts):
    """A simulated host that keeps its host key (tests that change or cut one make their own)."""
    return netns_hosts.make()


def _key_file(tmp_path, h) -> str:
    path = tmp_path / "id_kasa"
    path.write_text(h.client_private)
    path.chmod(0o600)
    return str(path)


def _host(h, name="web1", **kw) -> Host:
    return Host.objects.create(name=name, ssh_user="root", address=h.address, port=h.port, host_key=h.host_public,
                               private_key=h.client_private, customers_root=str(h.customers_root), **kw)


def _command(*args, stdin: str | None = None, monkeypatch=None):
    """(exit code, stdout, stderr) of a management command run in this process."""
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        call_command(*args, stdout=out, stderr=err)
        code = 0
    except CommandError as exc:
        code, err = exc.returncode, io.StringIO(err.getvalue() + str(exc))
    return code, out.getvalue(), err.getvalue()


def test_a_netns_host_answers_over_ssh_and_remote_words_stay_words(remote, tmp_path):
    target = ssh.Target(name="web1", user="root", address=remote.address, host_key=remote.host_public,
                        private_key=Secret(remote.client_private))
    with ssh.Session(target, tmp_path / "rt") as session:
        hello = session.run(["printf", "%s|", "a b", "$(id)", "; rm -rf /nonexistent", "it's"])
        assert hello.rc == 0 and hello.text == "a b|$(id)|; rm -rf /nonexistent|it's|"
        assert session.run(["cat"], input=b"through stdin").stdout == b"through stdin"
        assert session.run(["sh", "-c", "exit 3"]).rc == 3  # the command's own status, not an SSH failure
        assert session.control.exists()  # later commands ride on one multiplexed connection
    assert list((tmp_path / "rt").iterdir()) == []  # master stopped, key file and known_hosts removed


def test_a_session_whose_sshd_child_is_killed_fails_naming_the_host_and_the_next_command_reconnects(remote, tmp_path):
    target = ssh.Target(name="web1", user="root", address=remote.address, host_key=remote.host_public,
                        private_key=Secret(remote.client_private))
    with ssh.Session(target, tmp_path / "rt") as session:
        proc = session.stream(["sh", "-c", "head -c 50000000 /dev/zero; sleep 30"])
        assert proc.stdout.read(65536)  # the stream flows
        assert remote.kill_sessions()
        proc.stdout.read()
        rc, err = proc.wait(timeout=10), proc.stderr.read().decode()
        with pytest.raises(ssh.Unreachable, match=r"host web1 \(root@10\.231\.\d+\.2:22\) is unreachable"):
            session.check(rc, err)
        assert session.run(["echo", "again"]).text == "again\n"


def test_parse_ssh_spec_reads_user_address_and_port():
    assert parse_ssh_spec("root@10.0.0.5") == ("root", "10.0.0.5", 22)
    assert parse_ssh_spec("kasa@web2.example.com:2222") == ("kasa", "web2.example.com", 2222)
    assert parse_ssh_spec("kasa@[2001:db8::1]:2200") == ("kasa", "2001:db8::1", 2200)


def test_host_add_without_trust_stores_no_key_and_exits_2_showing_the_fingerprint(remote, tmp_path):
    fingerprint = ssh.fingerprint(remote.host_public)
    code, out, err = _command("host_add", "web-untrusted", "--ssh", remote.ssh_spec(), "--key-file",
                              _key_file(tmp_path, remote), "--label", "dc=fra1", "--customers-root",
                              str(remote.customers_root))
    assert code == 2, (out, err)
    assert fingerprint in out and "NOT trusted" in err
    assert f"host_trust web-untrusted --fingerprint {fingerprint}" in err
    host = Host.objects.get(name="web-untrusted")
    assert host.host_key == "" and not host.enabled and host.labels == {"dc": "fra1"}
    # Nothing connects without a pinned key: the probe says so, naming the host.
    host_probe(host)
    assert host.reachable is False and "web-untrusted" in host.last_error
    assert "no host key is trusted" in host.last_error
    # The trust pins exactly the key whose fingerprint was shown; a wrong fingerprint pins nothing.
    code, _out, err = _command("host_trust", "web-untrusted", "--fingerprint", "SHA256:" + "A" * 43)
    assert code == 2 and "does not offer" in err and Host.objects.get(name="web-untrusted").host_key == ""
    code, out, _err = _command("host_trust", "web-untrusted", "--fingerprint", fingerprint)
    assert code == 0 and fingerprint in out
    host.refresh_from_db()
    assert host.host_key == ssh.normalize_key_line(remote.host_public) and host.enabled


def test_host_add_with_trust_pins_the_scanned_key_and_takes_the_key_from_stdin(remote, monkeypatch):
    code, out, err = _command("host_add", "web-trusted", "--ssh", remote.ssh_spec(), "--key-stdin",
                              "--trust-host-key", "--customers-root", str(remote.customers_root), "--json",
                              stdin=remote.client_private, monkeypatch=monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["host_key"] == ssh.fingerprint(remote.host_public) and doc["enabled"] and doc["key"] == "stored"
    host = Host.objects.get(name="web-trusted")
    assert host.private_key.reveal().strip() == remote.client_private.strip()
    code, out, err = _command("host_check", "web-trusted", "--json")
    assert code == 0, err
    assert json.loads(out)["reachable"] is True
    code, out, _err = _command("host_list", "--json")
    assert {"web-trusted", LOCAL} <= {d["name"] for d in json.loads(out)}
    # A trusted host is not silently re-added over.
    code, _out, err = _command("host_add", "web-trusted", "--ssh", remote.ssh_spec(), "--key-file", "/nonexistent",
                               "--trust-host-key")
    assert code == 2 and "exists already" in err


def test_a_changed_host_key_is_refused_naming_the_host_and_both_fingerprints(netns_hosts):
    h = netns_hosts.make()
    host = _host(h, name="web-rekeyed")
    old = ssh.fingerprint(h.host_public)
    assert host_probe(host).reachable is True
    new = ssh.fingerprint(h.rekey())
    code, _out, err = _command("host_check", "web-rekeyed")
    assert code == 1
    for text in (err, Host.objects.get(pk=host.pk).last_error):
        assert "web-rekeyed" in text and old in text and new in text and "Refusing to connect" in text
    host.refresh_from_db()
    assert host.reachable is False and ssh.fingerprint(host.host_key) == old  # the pinned key is never replaced


def test_the_probe_records_os_space_and_tools_then_unreachable_when_cut_off_and_back_when_restored(netns_hosts,
                                                                                                   monkeypatch):
    h = netns_hosts.make()
    host = _host(h, name="web-probe")
    host_probe(host)
    host.refresh_from_db()
    assert host.reachable is True and host.last_error == "" and host.last_seen is not None
    assert host.os.startswith("Debian") and host.free_bytes > 0
    assert set(host.tools) == set(hostprobe.TOOLS)
    assert host.tools["python3"].startswith("3.") and host.tools["tar"] != hostprobe.MISSING
    seen = host.last_seen
    h.cut()
    try:
        started = time.monotonic()
        from hosts import tasks

        monkeypatch.setattr(tasks, "close_old_connections", lambda: None)  # the test's transaction stays open
        assert tasks.probe_host(host.pk).startswith("unreachable")  # the task never raises
        assert time.monotonic() - started < 30
        host.refresh_from_db()
        assert host.reachable is False and host.last_seen == seen
        assert "web-probe" in host.last_error and "unreachable" in host.last_error
    finally:
        h.restore()
    assert host_probe(host).reachable is True
    host.refresh_from_db()
    assert host.reachable and host.last_error == "" and host.last_seen > seen


def test_a_missing_tool_is_recorded_as_missing():
    answer = hostprobe.parse("os \"Debian GNU/Linux 12 (bookworm)\"\ndf /dev/x 100 50 42 50% /\ntool python3 "
                             "Python 3.11.2\ntool zstd\ntool mariadb-dump mariadb-dump  Ver 10.19 Distrib "
                             "10.11.6-MariaDB, for debian-linux-gnu\ntool pg_dump pg_dump (PostgreSQL) 15.10 "
                             "(Debian 15.10-0+deb12u1)\n")
    assert answer.os == "Debian GNU/Linux 12 (bookworm)" and answer.free_bytes == 42
    assert answer.tools == {"python3": "3.11.2", "tar": "missing", "zstd": "missing", "pm2": "missing",
                            "pg_dump": "15.10", "mariadb-dump": "10.11.6-MariaDB"}


def test_local_is_probed_without_ssh(monkeypatch, settings):
    def no_ssh(*args, **kwargs):
        raise AssertionError("the local host must be probed without SSH")

    monkeypatch.setattr(ssh.Session, "__init__", no_ssh)
    host = Host.objects.get(pk=local_host_pk())
    host_probe(host)
    host.refresh_from_db()
    assert host.reachable is True and host.os and host.free_bytes > 0
    assert host.tools["tar"] != hostprobe.MISSING and host.tools["python3"] != hostprobe.MISSING
    assert host.root() == str(settings.KASA_CUSTOMERS_ROOT)


def test_customer_add_host_puts_the_customer_on_that_host(remote, customer_root):
    web = _host(remote, name="web-shop")
    # The root is the host's: inside the host's customers root, not the worker's KASA_CUSTOMERS_ROOT.
    code, _out, err = _command("customer_add", "shop.example.com", "--root", str(customer_root), "--service",
                               "backend", "--host", "web-shop")
    assert code == 2 and "the customers root of host web-shop" in err
    root = remote.customers_root / "shop"
    code, _out, err = _command("customer_add", "shop.example.com", "--root", str(root), "--service",
                               "backend", "--host", "web-shop")
    assert code == 0, err
    assert Customer.objects.get(domain="shop.example.com").host == web
    code, _out, err = _command("customer_add", "nohost.example.com", "--root", str(customer_root), "--host", "nope")
    assert code == 2 and "no host named 'nope'" in err


def test_kasa_setup_schedules_the_host_probes():
    from django_q.models import Schedule

    call_command("kasa_setup", "--no-demo", "--json", stdout=io.StringIO())
    schedule = Schedule.objects.get(name="kasa: probe hosts")
    assert schedule.func == "hosts.tasks.probe_hosts" and schedule.repeats == -1


@pytest.mark.django_db(transaction=True)
def test_existing_customers_are_on_local_after_the_migration(customer_root, team):
    before = [("customers", "0004_tags_and_version_pin")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        old = executor.loader.project_state(before).apps
        OldCustomer, OldTeam = old.get_model("customers", "Customer"), old.get_model("customers", "Team")
        OldCustomer.objects.create(domain="old.example.com", root=str(customer_root), team=OldTeam.objects.get(
            pk=team.pk))
    finally:
        # Through 0005 (the one under test) to the newest migrations: the later tests and the model below need
        # the current schema (a later migration may add a column to the customers table).
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    customer = Customer.objects.get(domain="old.example.com")
    assert customer.host.name == LOCAL and customer.host.is_local
    assert os.path.isdir(customer_root)


def test_the_customer_changelist_filters_by_the_teams_hosts_and_the_page_shows_the_host(
        client, staff_user, team, make_customer, remote):
    from customers.models import Team

    mine, theirs = make_customer(), make_customer(team_=Team.objects.create(name="other-team"))
    make_customer()  # another of the team's, on local: two hosts to choose from
    Customer.objects.filter(pk=mine.pk).update(host=_host(remote, name="web-mine"))
    Customer.objects.filter(pk=theirs.pk).update(host=_host(remote, name="web-theirs"))
    client.force_login(staff_user(team))
    listing = client.get("/customers/customer/").content.decode()
    assert "web-mine" in listing and "web-theirs" not in listing  # not even as a filter choice
    filtered = client.get(f"/customers/customer/?host__id__exact={Host.objects.get(name='web-mine').pk}")
    assert mine.domain in filtered.content.decode()
    page = client.get(f"/customers/customer/{mine.pk}/change/").content.decode()
    assert "web-mine" in page


def test_check_now_in_the_admin_queues_a_probe_task_by_primary_key(client, admin_user, remote, monkeypatch,
                                                                   django_capture_on_commit_callbacks):
    queued = []
    monkeypatch.setattr("hosts.services.async_task", lambda func, *args: queued.append((func, args)))
    host = _host(remote, name="web-check")
    client.force_login(admin_user)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/hosts/host/", {"action": "check_now", "_selected_action": [host.pk]})
    assert response.status_code == 302
    assert queued == [("hosts.tasks.probe_host", (host.pk,))]
    from hosts import tasks

    monkeypatch.setattr(tasks, "close_old_connections", lambda: None)  # the test's transaction stays open
    assert tasks.probe_host(host.pk) == "reachable"
    page = client.get(f"/hosts/host/{host.pk}/change/").content.decode()
    assert "reachable" in page and "Debian" in page
