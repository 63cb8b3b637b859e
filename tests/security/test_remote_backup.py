"""A remote backup trusts nothing the host says (issue 14, points 2 and 9): a stream that is not the customer's tar
spoils only that customer's backup, which the drill then refuses before anything lands; a helper answer that lies
about the customer's folders stops the backup; the database forward is a private socket, no TCP port; no
database password or private key is on any process's command line while a remote backup runs."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from django.conf import settings

from backups import remote as remote_backup
from backups.models import Backup
from engines import ssh
from engines.secretbox import Secret
from tests.remote_fixtures import in_thread, make_host, remote_customer, run_backup, run_verify

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def web(netns_hosts):
    return netns_hosts.make()


def _cmdlines() -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return found


def test_a_host_whose_tar_sends_a_hostile_archive_spoils_only_its_own_backup_and_the_drill_refuses_it(
        web, team, tmp_path, monkeypatch):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        data = b"planted\n"
        member = tarfile.TarInfo("../escaped-by-remote-host")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    fake = tmp_path / "fake-tar"
    fake.write_text(f"#!/bin/sh\nexec cat {evil}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(remote_backup, "REMOTE_TAR", str(fake))  # what a hostile host's `tar` would send
    customer = remote_customer(web, make_host(web, "web-evil"), team, sqlite=False)
    run = run_backup(customer, scope="files")
    assert run.status == "succeeded", run.error  # bytes are bytes: the host may lie about its own files
    drill = run_verify(Backup.objects.get(run=run))
    assert drill.status == "failed" and "escaped-by-remote-host" in drill.error, drill.error
    assert not list(Path(settings.KASA_VAR_DIR).rglob("escaped-by-remote-host"))
    assert not list(Path(customer.root).parent.rglob("escaped-by-remote-host"))


class _LyingHost:
    def __init__(self, host, answer):
        self.host, self.where, self.answer = host, f"host {host.name}", answer

    def call(self, function, *args, **kwargs):
        return self.answer


LIES = [
    "not a dict",
    {"problems": "none"},
    {"problems": [], "root": "/etc", "services": {"backend": {"path": "backend", "link": None}}, "sqlite": {}},
    {"problems": [], "root": "ROOT", "services": {"backend": {"path": "../../etc", "link": None}}, "sqlite": {}},
    {"problems": [], "root": "ROOT", "services": {"backend": {"path": "/etc", "link": None}}, "sqlite": {}},
    {"problems": [], "root": "ROOT", "services": {"intruder": {"path": "x", "link": None}}, "sqlite": {}},
    {"problems": [], "root": "ROOT", "services": {"backend": {"path": "backend", "link": "/etc"}}, "sqlite": {}},
    {"problems": [], "root": "ROOT", "services": {"backend": {"path": "backend", "link": None}},
     "sqlite": {"cache": "/etc/shadow"}},
]


def test_a_helper_answer_that_lies_about_the_customers_folders_is_not_trusted(web, team):
    customer = remote_customer(web, make_host(web, "web-lies"), team)
    for answer in LIES:
        if isinstance(answer, dict) and answer.get("root") == "ROOT":
            answer["root"] = customer.root
        with pytest.raises(remote_backup.RemoteError, match="not trusted"):
            remote_backup.host_facts(_LyingHost(customer.host, answer), customer)
    # And the truth, for contrast: the real helper's answer is taken.
    with remote_backup.RemoteHost(customer.host) as real:
        facts = remote_backup.host_facts(real, customer)
    assert facts["services"] == {"backend": {"path": "backend", "link": None}}
    assert facts["sqlite"] == {"cache": f"{customer.root}/data/cache.sqlite3"}


def test_the_database_forward_is_a_private_socket_and_opens_no_tcp_port(web, tmp_path):
    target = ssh.Target(name="web-fwd", user="root", address=web.address, port=web.port, host_key=web.host_public,
                        private_key=Secret(web.client_private), connect_timeout=3)
    with ssh.Session(target, tmp_path / "ssh") as session:
        local = session.forward(web.address, web.port, name="f0/.s.PGSQL.22")  # the host's own sshd, as it sees it
        check = subprocess.run([ssh.SSH, *session.options(), "-O", "check", "-p", str(web.port), "-l", "root", "--",
                                web.address], capture_output=True, text=True, timeout=10)
        master = int(re.search(r"pid=(\d+)", check.stderr).group(1))
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        assert f"pid={master}," not in listening  # no TCP port at all, loopback or other
        assert stat.S_ISSOCK(os.stat(local).st_mode) and stat.S_IMODE(os.stat(local).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(local)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(session.dir).st_mode) == 0o700
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(local)
            assert s.recv(64).startswith(b"SSH-2.0-")  # the far end is reached from the host
        session.cancel_forward(local, web.address, web.port)
        assert not os.path.exists(local)


def test_no_database_password_or_private_key_is_in_any_processs_argv_during_a_remote_backup(host_pg, team):
    web, pg = host_pg
    host = make_host(web, "web-argv")
    key_line = web.client_private.strip().splitlines()[2]
    customer = remote_customer(web, host, team, databases=[("main", pg["url"])], big=6 << 20)
    thread, box = in_thread(run_backup, customer, bandwidth=6)
    seen, leaks = set(), []
    while thread.is_alive():
        for line in _cmdlines():
            if pg["password"] in line or key_line in line:
                leaks.append(line[:200])
            if line.startswith(ssh.SSH + " ") and "--create" in line:
                seen.add("tar over ssh")
            if "pg_dump" in line and "--format=custom" in line:
                seen.add("pg_dump")
        time.sleep(0.01)
    thread.join()
    assert box["result"].status == "succeeded", box["result"].error
    assert not leaks
    assert "tar over ssh" in seen  # the sampling did see the backup's processes
