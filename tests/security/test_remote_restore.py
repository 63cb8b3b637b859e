"""A restore on a remote host (issue 14, points 2 and 9): what lands there belongs to the customer's user as that
host knows it, never to root and never set-id; nothing of the backup keys (nor Kasa's secret keys) reaches the
host — not in the argv of anything run there, not in what the helper is asked, not in any file it wrote."""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path

import pytest
from django.conf import settings

from backups.models import Backup
from engines import secretbox, ssh
from engines.backupcrypto import KeyRing
from hosts import remote as hosts_remote
from tests.remote_fixtures import make_host, remote_customer, run_backup

pytestmark = pytest.mark.django_db(transaction=True)


def test_restored_files_on_a_remote_host_are_the_customers_never_root_or_set_id_and_no_key_reaches_the_host(
        netns_hosts, team, customer_users, monkeypatch, parents_open):
    from backups.services import restore_start
    from customers.models import Customer
    from operations.services import run_execute

    h = netns_hosts.make()
    user = customer_users[1]
    who = pwd.getpwnam(user)
    customer = remote_customer(h, make_host(h, "web-sec-restore"), team, sqlite=False)
    root = Path(customer.root)
    parents_open(root)  # pytest's folders are root's alone: the customer's user must reach its root
    (root / "backend" / "suid").write_text("#!/bin/sh\n")
    for p in [root / "backend", *(root / "backend").rglob("*")]:
        os.lchown(p, who.pw_uid, who.pw_gid)
    (root / "backend" / "suid").chmod(0o4755)  # set-id in the backup: never recreated
    (root / "backend" / "src").chmod(0o2755)
    os.chown(root, 0, who.pw_gid)
    root.chmod(0o750)
    Customer.objects.filter(pk=customer.pk).update(run_as=user)
    customer.refresh_from_db()
    run = run_backup(customer)
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    (root / "backend" / "src" / "app.js").write_text("changed\n")

    sent: list[str] = []
    real_call, real_argv = hosts_remote.RemoteHost.call, ssh.Session.argv

    def call(self, function, *args, **kwargs):
        sent.append(json.dumps([function, args, kwargs], default=str))
        return real_call(self, function, *args, **kwargs)

    def argv(self, remote, **kw):
        sent.append(json.dumps(list(remote)))
        return real_argv(self, remote, **kw)

    monkeypatch.setattr(hosts_remote.RemoteHost, "call", call)
    monkeypatch.setattr(ssh.Session, "argv", argv)
    run = restore_start(bk, confirmed=True, via="cli", enqueue=False, safety_backup=False)
    run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert any("engines.hostrestore.journal_write" in s for s in sent)  # the journal went to the host
    assert (root / "backend" / "src" / "app.js").read_text() == "console.log('hi')\n"

    # Owned by the customer's user as the host knows it; no set-id bit; nothing root's below the service folder.
    for p in [root / "backend", *(root / "backend").rglob("*")]:
        st = p.lstat()
        assert st.st_uid == who.pw_uid and st.st_uid != 0, p
        assert not (st.st_mode & (stat.S_ISUID | stat.S_ISGID)) or stat.S_ISLNK(st.st_mode), p
    assert any("set" in line.text and "suid" in line.text for line in run.log_lines.filter(level="warning"))

    # No key of Kasa's in anything that reached the host: the argv run there, the helper's calls, the files there.
    keys = secretbox.parse_keys(settings.KASA_BACKUP_KEYS) + secretbox.parse_keys(settings.KASA_SECRET_KEYS)
    ring = KeyRing(settings.KASA_BACKUP_KEYS)
    secrets = [*keys, *(ring.kek(i).hex() for i in ring.ids)]
    written = b"".join(p.read_bytes() for p in h.customers_root.rglob("*") if p.is_file() and not p.is_symlink())
    for secret in secrets:
        assert all(secret not in s for s in sent)
        assert secret.encode() not in written
