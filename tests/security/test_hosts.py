"""A host's private key reaches no admin page, argv, log line or exception; only superusers add or change hosts,
and a host key is pinned only by an explicit trust of the fingerprint shown (issue 14, point 9)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied
from django.db import connection

from engines import ssh
from engines.secretbox import Secret
from hosts.models import Host, local_host_pk
from hosts.services import host_add, host_probe, host_trust, runtime_dir
from tests.conftest import wait_until
from tests.sftp import _keypair

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def remote(netns_hosts):
    return netns_hosts.make()


def _host(h, name="sec1") -> Host:
    return Host.objects.create(name=name, ssh_user="root", address=h.address, port=h.port, host_key=h.host_public,
                               private_key=h.client_private, customers_root=str(h.customers_root), enabled=True)


def _key_body(private: str) -> str:
    """A line from the middle of the key: what would show if any part of it leaked."""
    return private.strip().splitlines()[2]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_the_private_key_is_in_no_argv_and_its_file_is_private_and_removed(remote, tmp_path):
    target = ssh.Target(name="sec1", user="root", address=remote.address, host_key=remote.host_public,
                        private_key=Secret(remote.client_private))
    body = _key_body(remote.client_private)
    with ssh.Session(target, tmp_path / "rt") as session:
        assert all(body not in a and "PRIVATE KEY" not in a for a in session.argv(["true"]))
        proc = session.stream(["sleep", "30"])
        try:
            def ours() -> list[list[str]]:
                # The client is "ssh -F …"; the master it forked renames itself "ssh: <control path> [mux]".
                argvs = [_cmdline(int(p)) for p in os.listdir("/proc") if p.isdigit()]
                return [a for a in argvs if a and a[0].startswith(("ssh", "/usr/bin/ssh"))
                        and any(str(session.dir) in w for w in a)]

            mine = wait_until(lambda: len(ours()) >= 2 and ours(), 10, interval=0.05,
                              what="the command's ssh client and the session's master")
            for argv in mine:
                assert not any(body in w or "PRIVATE KEY" in w for w in argv), argv
            assert any(f"IdentityFile={session.dir}/id" in argv for argv in mine)
        finally:
            proc.kill()
            proc.wait(timeout=10)
        key = session.dir / "id"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(session.dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "rt").stat().st_mode) == 0o700
    assert not key.exists() and not session.dir.exists()
    assert body not in repr(target) and body not in str(target)


def test_the_private_key_is_in_no_log_line_or_exception(remote, caplog):
    caplog.set_level(logging.DEBUG)
    wrong_private, _ = _keypair()  # a key the host does not accept
    host = Host.objects.create(name="sec-wrong", ssh_user="root", address=remote.address, port=remote.port,
                               host_key=remote.host_public, private_key=wrong_private,
                               customers_root=str(remote.customers_root))
    host = Host.objects.get(pk=host.pk)
    host_probe(host)
    assert host.reachable is False and "sec-wrong" in host.last_error and "refused" in host.last_error
    with pytest.raises(ssh.AuthFailed) as failure:
        ssh.run(host.target(), ["true"], runtime_dir=runtime_dir())
    body = _key_body(wrong_private)
    for text in (str(failure.value), repr(failure.value), host.last_error, caplog.text, repr(host.target())):
        assert body not in text and "PRIVATE KEY" not in text
    with connection.cursor() as cur:  # encrypted at rest
        cur.execute("SELECT private_key FROM hosts_host WHERE id = %s", [host.pk])
        raw = cur.fetchone()[0]
    assert raw.startswith("gAAAA") and body not in raw
    assert list(runtime_dir().iterdir()) == []  # no key file outlives its session


def test_the_private_key_never_appears_in_the_admin_html(client, admin_user, remote):
    host = _host(remote, name="sec-admin")
    body = _key_body(remote.client_private)
    client.force_login(admin_user)
    listing = client.get("/hosts/host/").content.decode()
    page = client.get(f"/hosts/host/{host.pk}/change/").content.decode()
    assert "sec-admin" in listing and ssh.fingerprint(remote.host_public) in page
    for html in (listing, page):
        assert body not in html and "PRIVATE KEY" not in html
    with connection.cursor() as cur:
        cur.execute("SELECT private_key FROM hosts_host WHERE id = %s", [host.pk])
        assert cur.fetchone()[0] not in page
    # Saved with the key field left empty: the stored key stays.
    before = Host.objects.get(pk=host.pk).private_key
    response = client.post(f"/hosts/host/{host.pk}/change/", {
        "name": "sec-admin", "ssh_user": "root", "address": remote.address, "port": "22",
        "customers_root": str(remote.customers_root), "labels": "{}", "db_client_tools": "kasa", "enabled": "on",
        "private_key": "", "key_file": ""})
    assert response.status_code == 302, response.content.decode()[:3000]
    assert Host.objects.get(pk=host.pk).private_key == before


def test_a_superuser_adds_a_host_in_the_admin_and_trusts_its_key_only_after_seeing_the_fingerprint(
        client, admin_user, remote):
    client.force_login(admin_user)
    response = client.post("/hosts/host/add/", {
        "name": "sec-added", "ssh_user": "root", "address": remote.address, "port": "22",
        "customers_root": str(remote.customers_root), "labels": "{}", "db_client_tools": "kasa",
        "private_key": remote.client_private, "key_file": ""})
    assert response.status_code == 302, response.content.decode()[:3000]
    host = Host.objects.get(name="sec-added")
    assert host.host_key == "" and not host.enabled  # nothing trusted silently
    fingerprint = ssh.fingerprint(remote.host_public)
    page = client.get(f"/hosts/host/{host.pk}/trust/").content.decode()
    assert fingerprint in page and "Trust this key" in page
    assert Host.objects.get(pk=host.pk).host_key == ""  # looking pins nothing
    response = client.post(f"/hosts/host/{host.pk}/trust/", {"fingerprint": fingerprint})
    assert response.status_code == 302
    host.refresh_from_db()
    assert ssh.fingerprint(host.host_key) == fingerprint and host.enabled
    assert host_probe(Host.objects.get(pk=host.pk)).reachable is True


def test_staff_who_are_not_superusers_cannot_add_change_or_trust_a_host(client, staff_user, team, remote):
    host = _host(remote, name="sec-staff")
    staff = staff_user(team)
    staff.user_permissions.add(*Permission.objects.filter(content_type__app_label="hosts"))  # even holding them
    client.force_login(staff)
    form = {"name": "sec-evil", "ssh_user": "root", "address": "10.9.9.9", "port": "22",
            "customers_root": "/srv", "labels": "{}", "private_key": "x", "key_file": ""}
    assert client.post("/hosts/host/add/", form).status_code == 403
    assert client.post(f"/hosts/host/{host.pk}/change/", {**form, "name": "sec-staff"}).status_code == 403
    assert client.post(f"/hosts/host/{host.pk}/trust/", {"fingerprint": "SHA256:x"}).status_code == 403
    assert client.post(f"/hosts/host/{host.pk}/delete/", {"post": "yes"}).status_code == 403
    assert not Host.objects.filter(name="sec-evil").exists() and Host.objects.filter(name="sec-staff").exists()
    with pytest.raises(PermissionDenied):
        host_add(name="sec-svc", user="root", address="10.9.9.9", key_file="/k", actor=staff)
    with pytest.raises(PermissionDenied):
        host_trust(host, "SHA256:x", actor=staff)


def test_a_view_only_staff_member_sees_hosts_but_no_key(client, staff_user, team, remote):
    host = _host(remote, name="sec-view")
    viewer = staff_user(team)
    viewer.user_permissions.add(Permission.objects.get(content_type__app_label="hosts", codename="view_host"))
    client.force_login(viewer)
    listing = client.get("/hosts/host/")
    assert listing.status_code == 200 and "sec-view" in listing.content.decode()
    page = client.get(f"/hosts/host/{host.pk}/change/")
    html = page.content.decode()
    assert page.status_code == 200 and "sec-view" in html
    assert _key_body(remote.client_private) not in html and 'name="private_key"' not in html
    assert "Trust this host key" not in html
    # Without the view permission, nothing.
    other = staff_user(team)
    client.force_login(other)
    assert client.get("/hosts/host/").status_code == 403


def test_the_local_host_cannot_be_deleted_or_renamed(client, admin_user):
    local = Host.objects.get(pk=local_host_pk())
    client.force_login(admin_user)
    assert client.post(f"/hosts/host/{local.pk}/delete/", {"post": "yes"}).status_code == 403
    html = client.get(f"/hosts/host/{local.pk}/change/").content.decode()
    assert 'name="name"' not in html and 'name="address"' not in html
    assert Host.objects.filter(name="local").exists()


def test_an_address_or_user_that_looks_like_an_option_is_refused():
    for address, user in (("-oProxyCommand=touch /tmp/x", "root"), ("10.0.0.1", "-oProxyCommand=x")):
        host = Host(name="sec-opt", ssh_user=user, address=address, customers_root="/srv", key_file="/k")
        with pytest.raises(Exception) as refused:
            host.full_clean()
        assert "address" in str(refused.value) or "ssh_user" in str(refused.value)
