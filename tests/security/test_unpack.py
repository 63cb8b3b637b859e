"""Attacks of issue 11 on unpacking: a backup that holds a setuid-root file, and a release zip with nested links.

Each test is the attack itself, through the real commands (backup, restore, release_sync) on real files, tar
and OS users; each failed on the code before the fix (see the report of part `unpack`).
"""

from __future__ import annotations

import io
import json
import os
import pwd
import stat
import zipfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from operations.models import RunLogLine
from releases.models import ComponentVersion, Release
from tests.restore_helpers import command_json

pytestmark = pytest.mark.django_db(transaction=True)


def _warnings(run_id: int) -> list[str]:
    return list(RunLogLine.objects.filter(run_id=run_id, level="warning").order_by("seq").values_list("text",
                                                                                                      flat=True))


def test_a_restored_setuid_root_file_is_neither_setuid_nor_root_owned(make_customer, customer_users):
    """A backup holding a setuid-root program (and a setgid folder), restored in place: the files come back
    owned by the customer's run_as user, without set-id bits, and the run's log names each stripped member."""
    user = customer_users[0]
    owner = pwd.getpwnam(user)
    customer = make_customer(services=("backend",))
    customer.run_as = user
    customer.save()
    backend = customer.root_path() / "backend"
    (backend / "bin").mkdir()
    tool = backend / "bin" / "rootshell"
    tool.write_text("#!/bin/sh\nexec /bin/sh -p\n")
    os.chown(tool, 0, 0)
    os.chmod(tool, 0o4755)
    os.chmod(backend / "bin", 0o2755)
    (backend / "app.js").write_text("console.log('hi')\n")
    code, doc = command_json("backup", customer.domain)
    assert code == 0, doc
    tool.unlink()  # what the restore must bring back

    code, run = command_json("restore", str(doc["id"]), "--yes")

    assert code == 0, run
    assert tool.read_text() == "#!/bin/sh\nexec /bin/sh -p\n"
    for path in (tool, backend / "bin", backend / "app.js", backend):
        st = path.lstat()
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{path} mode {st.st_mode:o}"
        assert (st.st_uid, st.st_gid) == (owner.pw_uid, owner.pw_gid), f"{path} belongs to {st.st_uid}"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755 and stat.S_IMODE((backend / "bin").stat().st_mode) == 0o755
    warnings = _warnings(run["id"])
    assert any("'backend/bin/rootshell'" in w and "setuid" in w for w in warnings), warnings
    assert any("'backend/bin/'" in w and "setgid" in w for w in warnings), warnings


def _zip(path: Path, files: dict[str, str], links: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix: external_attr holds the mode, as Info-ZIP writes symlinks
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)


def test_a_release_zip_with_nested_links_out_of_its_folder_is_refused_whole(db, tmp_path):
    """The issue's zip: backend/l -> . and backend/x -> l/l/.. . Unpacked without its top folder, x resolves
    to the parent of the component folder. release_sync refuses the whole release (exit 2), nothing imported."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    _zip(folder / "backend-2.5.0.zip", {"backend/server.js": "x"}, {"backend/l": ".", "backend/x": "l/l/.."})
    _zip(folder / "admin-2.5.0.zip", {"admin/index.html": "ok"}, {})
    (folder / "releases.json").write_text(json.dumps({
        "backend": [{"version": "2.5.0", "file": "backend-2.5.0.zip"}],
        "admin": [{"version": "2.5.0", "file": "admin-2.5.0.zip"}],
        "compatMatrix": [{"backend": "2.5.0", "admin": "2.5.0"}]}))
    out = io.StringIO()

    with pytest.raises(CommandError) as refused:
        call_command("release_sync", str(folder), "--json", stdout=out, stderr=io.StringIO())

    assert refused.value.returncode == 2
    error = json.loads(out.getvalue())["error"]
    assert "symlink 'backend/x' → 'l/l/..' leads outside the component folder" in error, error
    assert "nothing was imported" in error
    assert ComponentVersion.objects.count() == 0 and Release.objects.count() == 0
