"""A backup warns at backup time about what its restore would refuse (issue 15, point 7): FIFOs, device files,
paths longer than a restore accepts, symbolic links leaving the folder (tests/test_backups.py covers those);
a socket is skipped by tar and is not a refusal. The restore then refuses the artifact at once."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
import subprocess

import pytest
from django.core.management import CommandError, call_command

from engines import sources, tarcheck
from operations.models import Run
from tests.test_backups import _backup_json, _folder


def _deep(top, levels: int = 17) -> str:
    """A path under top longer than 4096 bytes (each component 250 bytes): made one folder at a time."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d" * 250, dir_fd=fd)
            new = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    return "/".join(["d" * 250] * levels) + "/f"


def _plant_specials(svc) -> socket.socket:
    (svc / "sub").mkdir(parents=True)
    (svc / "logs").mkdir()
    os.mkfifo(svc / "sub" / "queue")
    os.mkfifo(svc / "logs" / "pipe")  # excluded with the logs: not backed up, not listed
    os.mknod(svc / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(svc / "app.sock"))  # tar skips sockets: nothing to refuse
    (svc / "app.js").write_text("ok\n")
    return sock


def test_restore_refusals_are_exactly_what_tarcheck_refuses_in_the_archive(tmp_path):
    svc = tmp_path / "backend"
    sock = _plant_specials(svc)
    try:
        deep = _deep(svc)
        found = sources.restore_refusals(str(tmp_path), "backend", excludes=["logs"])
        # Each alone in an archive (the others excluded), as the backup's tar writes it.
        alone = {}
        for name, others in (("backend/sub/queue", ["null", "d" * 250]), ("backend/null", ["queue", "d" * 250]),
                             (f"backend/{deep}", ["queue", "null"])):
            stage = sources.tar_stage(str(tmp_path), ["backend"], excludes=["logs", *others])
            alone[name] = subprocess.run(stage.argv, capture_output=True, check=False).stdout
    finally:
        sock.close()
    special = dict(found["special"])
    assert special.pop("backend/sub/queue") == "a FIFO"
    assert special.pop("backend/null") == "a character device"
    long = {p for p in special if len(p.encode()) > sources.MAX_MEMBER_NAME}
    assert f"backend/{deep}" in long and long == set(special)  # the deepest folders and the file
    assert found["links"] == []
    # The restore's checker refuses each of them, and nothing else: the archive with them left out passes.
    for name, archive in alone.items():
        scanner = tarcheck.TarScanner("backend.tar")
        with pytest.raises(tarcheck.ArchiveRefused) as refused:
            scanner.feed(archive)
        assert name.startswith(refused.value.member.split("…")[0]), (name[:60], refused.value.member[:60])
    excludes = ["logs", "queue", "null", "d" * 250]
    clean = subprocess.run(sources.tar_stage(str(tmp_path), ["backend"], excludes=excludes).argv,
                           capture_output=True, check=False).stdout
    scanner = tarcheck.TarScanner("backend.tar")
    scanner.feed(clean)
    assert scanner.finish().files == 1  # app.js; the socket was skipped
    assert sources.restore_refusals(str(tmp_path), "backend", excludes=excludes) == {"links": [], "special": []}


@pytest.mark.django_db(transaction=True)
def test_a_fifo_or_device_is_named_at_backup_time_and_its_artifact_refused_by_a_restore(
        make_customer, customer_root, admin_client):
    sock = _plant_specials(customer_root / "backend")
    try:
        customer = make_customer(services=("backend",))
        doc = _backup_json(customer.domain, "--scope", "files")
    finally:
        sock.close()

    assert doc["status"] == "succeeded"
    run = Run.objects.get(backup__pk=doc["id"])
    warnings = [line.text for line in run.log_lines.filter(level="warning")]
    assert len(warnings) == 1, warnings
    assert "2 file(s) a restore never creates" in warnings[0]
    assert "backend/sub/queue (a FIFO)" in warnings[0] and "backend/null (a character device)" in warnings[0]
    assert "logs" not in warnings[0] and "app.sock" not in warnings[0]
    manifest = json.loads((_folder(doc) / "backup.json").read_text())
    assert manifest["artifacts"][0]["unrestorable"]["count"] == 2
    page = admin_client.get(f"/backups/backup/{doc['id']}/change/").content.decode()
    assert "2 FIFO(s), device file(s) or overlong path(s)" in page
    # The restore refuses at once (before a safety backup or staging), and the Restore page does not tick it.
    runs = Run.objects.count()
    with pytest.raises(CommandError, match="2 file\\(s\\) a restore never creates") as refused:
        call_command("restore", str(doc["id"]), "--yes", stdout=io.StringIO())
    assert refused.value.returncode == 2 and Run.objects.count() == runs
    page = admin_client.get(f"/backups/backup/{doc['id']}/restore/").content.decode()
    box = re.search(r'<input[^>]*value="backend\.tar\.zst\.enc"[^>]*>', page).group(0)
    assert "checked" not in box and "a restore never creates" in page


@pytest.mark.django_db(transaction=True)
def test_names_that_are_not_utf8_are_named_in_the_warning_and_the_catalogue(make_customer, customer_root):
    backend = customer_root / "backend"
    backend.mkdir()
    os.symlink("/etc", os.fsencode(backend) + b"/caf\xe9")
    os.mkfifo(os.fsencode(backend) + b"/q\xff")
    customer = make_customer(services=("backend",))
    doc = _backup_json(customer.domain, "--scope", "files")
    assert doc["status"] == "succeeded", doc
    art = Run.objects.get(backup__pk=doc["id"]).backup.artifacts.get()
    assert art.details["outward_links"]["examples"] == ["backend/caf\\udce9 -> /etc"]
    assert art.details["unrestorable"]["examples"] == ["backend/q\\udcff (a FIFO)"]


def test_a_symlink_climbing_back_out_of_a_symlink_is_named_and_one_out_of_a_real_folder_is_not(tmp_path):
    svc = tmp_path / "backend"
    (svc / "sub").mkdir(parents=True)
    (svc / "x").write_text("x\n")
    (svc / "up").symlink_to(".")
    (svc / "esc").symlink_to("up/../x")  # from wherever up points: refused, in whichever order tar archives them
    (svc / "sub" / "deep").symlink_to("../sub/../up/../x")
    (svc / "ok").symlink_to("sub/../x")  # sub is a real folder: restores, before or after sub in the archive
    (svc / "logs").symlink_to("/var/log")
    (svc / "via-logs").symlink_to("logs/../x")  # logs is left out of the backup: never archived, never refused
    found = sources.restore_refusals(str(tmp_path), "backend", excludes=["logs"])
    assert sorted(found["links"]) == [["backend/esc", "up/../x"], ["backend/sub/deep", "../sub/../up/../x"]]
    archive = subprocess.run(sources.tar_stage(str(tmp_path), ["backend"], excludes=["logs"]).argv,
                             capture_output=True, check=True).stdout
    with pytest.raises(tarcheck.ArchiveRefused):
        tarcheck.TarScanner("backend.tar").feed(archive)
    clean = subprocess.run(sources.tar_stage(str(tmp_path), ["backend"], excludes=["logs", "esc", "deep"]).argv,
                           capture_output=True, check=True).stdout
    scanner = tarcheck.TarScanner("backend.tar")
    scanner.feed(clean)
    assert scanner.finish().symlinks == 3  # up, ok and via-logs
