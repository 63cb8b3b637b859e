"""The release registry (issue 5, point 1): releases.json + zips imported all or nothing, semver order,
`requires` ranges, release_sync / release_list, and the admin upload page.

No server is needed beyond the control database, so the whole module also runs on SQLite (smoke).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.models import AuditEntry
from engines.releasepkg import PackageError, Range, Version, VersionError, ZipRefused, check_zip, parse_package
from releases.models import ComponentVersion, Release, ReleaseComponent
from releases.services import (
    ReleaseInputError,
    ReleaseStorageError,
    blob_name,
    component_zip_copy,
    component_zip_open,
    component_zip_path,
    release_sync,
    releases_for,
)

pytestmark = pytest.mark.smoke
COMPONENTS = ("backend", "admin", "store")


# --- building packages -------------------------------------------------------------------------------------------
def make_zip(path: Path, files: dict[str, str | bytes], *, links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix: external_attr holds the mode, as Info-ZIP writes symlinks
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def component_files(comp: str, version: str, token: str) -> dict[str, str]:
    return {
        f"{comp}/package.json": json.dumps({"name": comp, "version": version, "token": token}),
        f"{comp}/server.js": f"console.log('{comp} {version} {token}')\n",
        f"{comp}/.env.example": "# example\nPORT=3000\nDATABASE_URL=postgres://u:p@h/db\nexport SECRET_KEY='x'\n",
    }


def build(tmp_path: Path, versions=("2.4.0", "2.5.0")) -> tuple[Path, dict]:
    """A package folder with releases.json and one zip per component and version; returns (folder, data)."""
    folder = tmp_path / "pkg"
    folder.mkdir(exist_ok=True)
    data: dict = {}
    for comp in COMPONENTS:
        data[comp] = []
        for v in versions:
            name = f"{comp}-{v}.zip"
            make_zip(folder / name, component_files(comp, v, tmp_path.name))
            data[comp].append({"version": v, "file": name})
    data["backend"][-1]["requires"] = {"from": f">={versions[0]} <3"}
    data["backend"][-1]["hooks"] = {"install": ["npm", "ci"], "migrate": ["npm", "run", "migrate"]}
    data["compatMatrix"] = [{c: v for c in COMPONENTS} for v in versions]
    save(folder, data)
    return folder, data


def save(folder: Path, data: dict) -> None:
    (folder / "releases.json").write_text(json.dumps(data, indent=2))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def counts() -> tuple[int, int, int]:
    return ComponentVersion.objects.count(), Release.objects.count(), ReleaseComponent.objects.count()


def stored_blobs() -> set[str]:
    root = Path(settings.KASA_STORAGE_DIR) / "releases"
    return {str(p) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def command(*args) -> tuple[int, dict | list]:
    out = io.StringIO()
    try:
        call_command(*args, "--json", stdout=out, stderr=io.StringIO())
        code = 0
    except CommandError as exc:
        code = exc.returncode
    return code, json.loads(out.getvalue())


# --- semver and ranges (pure engine) -------------------------------------------------------------------------------
def test_semver_orders_numbers_numerically_and_prereleases_before_the_release():
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
               "1.0.0-rc.1", "1.0.0", "2.9.0", "2.10.0", "10.0.0"]
    assert [str(v) for v in sorted(Version.parse(s) for s in reversed(ordered))] == ordered
    assert Version.parse("2.10.0") > Version.parse("2.9.0")
    assert Version.parse("2.5.0+build.7") == Version.parse("2.5.0")  # build metadata has no precedence


@pytest.mark.parametrize("text", ["2.4", "v2.4.0", "02.4.0", "2.4.0-", "2.4.0-rc..1", "latest", "", "2.4.0 "])
def test_semver_refuses_malformed_versions(text):
    with pytest.raises(VersionError, match="not a semantic version"):
        Version.parse(text)


@pytest.mark.parametrize("rng, inside, outside", [
    (">=2.4.0 <3", ["2.4.0", "2.10.3"], ["2.3.9", "3.0.0", "3.0.0-rc.1", "2.5.0-rc.1"]),
    (">2.4.0 <=2.6.0", ["2.4.1", "2.6.0"], ["2.4.0", "2.6.1"]),
    ("==2.4.0", ["2.4.0"], ["2.4.1"]),
    ("2.4.0", ["2.4.0"], ["2.4.1"]),
    ("^2.4", ["2.4.0", "2.99.0"], ["2.3.0", "3.0.0"]),
    ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0"]),
    ("~2.4.1", ["2.4.1", "2.4.9"], ["2.4.0", "2.5.0"]),
    ("~2", ["2.0.0", "2.9.9"], ["3.0.0"]),
    (">=2.5.0-rc.1", ["2.5.0-rc.2", "2.5.0", "2.6.0"], ["2.5.0-beta", "2.6.0-rc.1"]),
    ("<2.0.0 || >=3", ["1.9.0", "3.1.0"], ["2.5.0"]),
    (">= 2.4.0", ["2.4.0"], ["2.3.0"]),
])
def test_ranges_support_comparators_caret_tilde_and_or(rng, inside, outside):
    parsed = Range.parse(rng)
    assert [v for v in inside if not parsed.satisfied_by(Version.parse(v))] == []
    assert [v for v in outside if parsed.satisfied_by(Version.parse(v))] == []


@pytest.mark.parametrize("rng, message", [(">2.4", "ambiguous"), ("<=2", "ambiguous"), ("2.4", "ambiguous"),
                                          ("1.0.0 - 2.0.0", "hyphen"), (">=two", "not a comparator"),
                                          ("", "not a version range"), ("<1 ||", "empty alternative")])
def test_ranges_refuse_ambiguous_or_malformed_text(rng, message):
    with pytest.raises(VersionError, match=message):
        Range.parse(rng)


def test_package_shape_errors_are_all_reported_at_once():
    with pytest.raises(PackageError) as err:
        parse_package({"backend": [{"version": "2.4", "file": "b.zip"}, {"version": "2.5.0", "file": "../b.zip",
                                                                         "hook": {}}],
                       "admin": "2.4.0", "compatMatrix": [{"backend": "9.9.9"}]})
    text = str(err.value)
    assert len(err.value.problems) == 5, err.value.problems
    for part in ("'2.4' is not a semantic version", "contains '..'", "unknown key(s) hook",
                 "component 'admin' must be a list", "backend 9.9.9 is not listed"):
        assert part in text


def test_zip_report_names_the_root_folder_and_env_example_keys(tmp_path):
    report = check_zip(make_zip(tmp_path / "b.zip", component_files("backend", "2.4.0", "t")))
    assert report.root == "backend"
    assert report.env_example == ["PORT", "DATABASE_URL", "SECRET_KEY"]
    assert report.sha256 == sha(tmp_path / "b.zip") and report.members == 3


def test_symlinks_that_stay_inside_are_accepted(tmp_path):
    # node_modules/.bin links climb with '..' but stay in the folder: a real package has them.
    path = make_zip(tmp_path / "ok.zip", {"app/node_modules/pkg/cli.js": "x"},
                    links={"app/node_modules/.bin/cli": "../pkg/cli.js", "app/current": "."})
    assert check_zip(path).members == 3


# Links are judged in the component folder, as staging unpacks them: the zip's top folder stripped.
LINKS_INSIDE = [
    ("to-dot", {"app/a": "x"}, {"app/l": "."}),
    ("dot-used-twice-then-down", {"app/sub/f": "x"}, {"app/l": ".", "app/x": "l/l/sub/f"}),
    ("chain-inside", {"app/d/f": "x"}, {"app/a": "b", "app/b": "d", "app/c": "a/f"}),
    ("climb-through-a-link-to-a-subfolder", {"app/d/e/f": "x"}, {"app/l": "d/e", "app/x": "l/../../d"}),
    ("no-top-folder", {"a": "x", "d/f": "y"}, {"l": ".", "x": "l/d/../a"}),
]
LINKS_OUTSIDE = [
    ("issue-example", {"backend/server.js": "x"}, {"backend/l": ".", "backend/x": "l/l/.."},
     "symlink 'backend/x' → 'l/l/..' leads outside"),
    ("top-folder-parent", {"app/a": "x"}, {"app/up": ".."}, "symlink 'app/up' → '..' leads outside"),
    ("chain-out", {"app/a": "x"}, {"app/a1": "a2", "app/a2": "sub/a3", "app/sub/a3": "../.."},
     "symlink 'app/a1' → 'a2' leads outside"),
    ("through-a-link-to-a-subfolder", {"app/d/f": "x"}, {"app/l": "d", "app/x": "l/../.."},
     "symlink 'app/x' → 'l/../..' leads outside"),
    ("loop", {"app/a": "x"}, {"app/p": "q", "app/q": "p"}, "goes through more than 40 symlinks (a loop?)"),
    ("absolute", {"app/a": "x"}, {"app/etc": "/etc"}, "points outside the component folder"),
    ("member-written-through-a-link", {"app/d/f": "x", "app/l/passwd": "evil"}, {"app/l": "d"},
     "member 'app/l/passwd' would be written through the symlink 'app/l'"),
    ("link-written-through-a-link", {"app/d/f": "x"}, {"app/l": "d", "app/l/x": "f"},
     "would be written through the symlink 'app/l'"),
]


@pytest.mark.parametrize("files, links", [c[1:] for c in LINKS_INSIDE], ids=[c[0] for c in LINKS_INSIDE])
def test_links_that_resolve_inside_the_component_folder_are_accepted(tmp_path, files, links):
    assert check_zip(make_zip(tmp_path / "ok.zip", files, links=links)).members == len(files) + len(links)


@pytest.mark.parametrize("files, links, message", [c[1:] for c in LINKS_OUTSIDE], ids=[c[0] for c in LINKS_OUTSIDE])
def test_links_that_resolve_outside_the_component_folder_are_refused(tmp_path, files, links, message):
    with pytest.raises(ZipRefused, match=re.escape(message)):
        check_zip(make_zip(tmp_path / "bad.zip", files, links=links))


def _unix_member(zf: zipfile.ZipFile, name: str, mode: int, data: bytes = b"x") -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    zf.writestr(info, data)


def test_setid_members_are_listed_and_devices_refused(tmp_path):
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w") as zf:
        _unix_member(zf, "app/bin/", stat.S_IFDIR | 0o2755, b"")
        _unix_member(zf, "app/bin/su", stat.S_IFREG | 0o4755)
        _unix_member(zf, "app/plain", stat.S_IFREG | 0o644)
    assert check_zip(path).setid == [("app/bin", stat.S_IFDIR | 0o2755), ("app/bin/su", stat.S_IFREG | 0o4755)]
    for kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        with zipfile.ZipFile(path, "w") as zf:
            _unix_member(zf, "app/dev", kind | 0o666, b"")
        with pytest.raises(ZipRefused, match="member 'app/dev' is a device, FIFO or socket"):
            check_zip(path)


# --- sync ----------------------------------------------------------------------------------------------------------
def test_sync_registers_versions_and_releases_and_stores_zips_by_content(db, tmp_path):
    folder, data = build(tmp_path)
    result = release_sync(folder / "releases.json")
    assert sorted(result.versions_created) == sorted(f"{c} {v}" for c in COMPONENTS for v in ("2.4.0", "2.5.0"))
    assert result.releases_created == ["2.4.0", "2.5.0"] and result.blobs_written == 6
    assert counts() == (6, 2, 6)
    cv = ComponentVersion.objects.get(component="backend", version="2.5.0")
    assert cv.sha256 == sha(folder / "backend-2.5.0.zip") and cv.size == (folder / "backend-2.5.0.zip").stat().st_size
    assert cv.file == blob_name("backend", cv.sha256) == f"releases/backend/{cv.sha256}.zip"
    assert cv.requires == {"from": ">=2.4.0 <3"} and cv.hooks["migrate"] == ["npm", "run", "migrate"]
    assert cv.env_example == ["PORT", "DATABASE_URL", "SECRET_KEY"] and cv.root == "backend"
    with component_zip_open(cv) as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == cv.sha256
    assert component_zip_path(cv).read_bytes() == (folder / "backend-2.5.0.zip").read_bytes()
    assert Release.objects.get(name="2.5.0").versions() == {c: "2.5.0" for c in COMPONENTS}
    entry = AuditEntry.objects.get(action="release.sync")
    assert entry.source == "cli" and entry.result == "ok" and entry.changes["releases_created"] == ["2.4.0", "2.5.0"]


def test_sync_again_is_idempotent(db, tmp_path):
    folder, _ = build(tmp_path)
    release_sync(folder)
    before = (counts(), list(ComponentVersion.objects.values_list("pk", "sha256", "rank")), stored_blobs())
    again = release_sync(folder / "releases.json")
    assert not again.changed and again.blobs_written == 0 and again.blobs_reused == 6
    assert len(again.versions_existing) == 6 and again.releases_existing == ["2.4.0", "2.5.0"]
    assert (counts(), list(ComponentVersion.objects.values_list("pk", "sha256", "rank")), stored_blobs()) == before


def test_a_truncated_blob_left_in_storage_is_replaced_not_reused(db, tmp_path):
    folder, data = build(tmp_path, versions=("2.4.0",))
    name = blob_name("backend", sha(folder / "backend-2.4.0.zip"))
    default_storage.delete(name)
    default_storage.save(name, io.BytesIO(b"PK cut short"))
    release_sync(folder)
    cv = ComponentVersion.objects.get(component="backend")
    with component_zip_open(cv) as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == cv.sha256


def _bad_semver(folder, data):
    data["store"][0]["version"] = "2.4"


def _unknown_component_in_matrix(folder, data):
    data["compatMatrix"].append({"backend": "2.5.0", "payments": "1.0.0", "release": "with-payments"})


def _missing_zip(folder, data):
    (folder / "admin-2.5.0.zip").unlink()


def _checksum_mismatch(folder, data):
    data["admin"][0]["sha256"] = "0" * 64


def _replace_zip(comp, version, files, links=None):
    def mutate(folder, data):
        make_zip(folder / f"{comp}-{version}.zip", files, links=links)
    return mutate


def _declared_bomb(folder, data):
    path = make_zip(folder / "store-2.5.0.zip", {"store/a.txt": b"tiny"})
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, raw.rfind(b"PK\x01\x02") + 24, 3 << 30)  # central directory: 3 GiB unpacked
    path.write_bytes(bytes(raw))


def _hooks_shell_string(folder, data):
    data["admin"][1]["hooks"] = {"build": "npm ci && npm run build"}


def _hooks_not_strings(folder, data):
    data["admin"][1]["hooks"] = {"install": ["npm", 7]}


def _unknown_hook(folder, data):
    data["admin"][1]["hooks"] = {"postinstall": ["npm", "ci"]}


def _bad_requires(folder, data):
    data["store"][1]["requires"] = {"from": ">2.4"}


def _matrix_version_not_listed(folder, data):
    data["compatMatrix"].append({"backend": "2.6.0"})


def _duplicate_version(folder, data):
    data["backend"].append({"version": "2.5.0+rebuilt", "file": "backend-2.5.0.zip"})


def _file_outside(folder, data):
    data["admin"][0]["file"] = "../admin-2.4.0.zip"


def _not_a_zip(folder, data):
    (folder / "admin-2.4.0.zip").write_bytes(b"this is not a zip file at all")


REFUSALS = [
    ("bad-semver", _bad_semver, "'2.4' is not a semantic version"),
    ("unknown-component", _unknown_component_in_matrix, "names component 'payments', which is not listed"),
    ("missing-zip", _missing_zip, "zip 'admin-2.5.0.zip' not found"),
    ("checksum", _checksum_mismatch, "not the 0000000000000000000000000000000000000000000000000000000000000000"),
    ("dotdot-member", _replace_zip("backend", "2.5.0", {"backend/ok.js": "", "../x": "evil"}),
     "member '../x' escapes the component folder"),
    ("nested-dotdot", _replace_zip("backend", "2.5.0", {"backend/../../x": "evil"}), "escapes the component folder"),
    ("absolute-member", _replace_zip("backend", "2.5.0", {"/etc/cron.d/x": "evil"}),
     "'/etc/cron.d/x' is not a relative"),
    ("backslash-member", _replace_zip("backend", "2.5.0", {"..\\x": "evil"}), "backslash"),
    ("symlink-out", _replace_zip("backend", "2.5.0", {"backend/a": "x"}, {"backend/etc": "../../etc"}),
     "symlink 'backend/etc' → '../../etc' leads outside"),
    ("symlink-absolute", _replace_zip("backend", "2.5.0", {"backend/a": "x"}, {"backend/etc": "/etc"}),
     "points outside the component folder"),
    ("symlink-chain", _replace_zip("backend", "2.5.0", {"backend/a": "x"}, {"l": ".", "x": "l/l/.."}),
     "symlink 'x' → 'l/l/..' leads outside"),
    ("write-through-link", _replace_zip("backend", "2.5.0", {"up/passwd": "x"}, {"up": ".."}),
     "leads outside the component folder"),
    ("declared-bomb", _declared_bomb, "would unpack to 3221225472 bytes, more than the 2147483648 allowed"),
    ("hooks-shell-string", _hooks_shell_string, "hook build must be a non-empty list of strings"),
    ("hooks-not-strings", _hooks_not_strings, "hook install must be a non-empty list of strings"),
    ("unknown-hook", _unknown_hook, "unknown hook 'postinstall'"),
    ("bad-requires", _bad_requires, "'>2.4' is ambiguous"),
    ("matrix-version-not-listed", _matrix_version_not_listed, "backend 2.6.0 is not listed under 'backend'"),
    ("duplicate-version", _duplicate_version, "backend 2.5.0+rebuilt is listed twice (as '2.5.0' and '2.5.0+rebuilt')"),
    ("not-a-zip", _not_a_zip, "admin-2.4.0.zip is not a valid zip file"),
    ("file-outside", _file_outside, "file '../admin-2.4.0.zip' contains '..'"),
]


@pytest.mark.parametrize("mutate, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_sync_refuses_invalid_input_with_exit_2_and_imports_nothing(db, tmp_path, mutate, message):
    folder, data = build(tmp_path)
    mutate(folder, data)
    save(folder, data)
    blobs = stored_blobs()
    code, doc = command("release_sync", str(folder / "releases.json"))
    assert code == 2, doc
    assert message in doc["error"] and "nothing was imported" in doc["error"], doc["error"]
    assert counts() == (0, 0, 0) and stored_blobs() == blobs
    assert AuditEntry.objects.get(action="release.sync").result.startswith("refused: ")


def test_sync_lists_every_problem_at_once(db, tmp_path):
    folder, data = build(tmp_path)
    _bad_semver(folder, data)
    _missing_zip(folder, data)
    _replace_zip("backend", "2.4.0", {"/abs": "x"})(folder, data)
    save(folder, data)
    with pytest.raises(ReleaseInputError) as err:
        release_sync(folder)
    for part in ("store[0]: version '2.4' is not a semantic version", "zip 'admin-2.5.0.zip' not found",
                 "backend 2.4.0: backend-2.4.0.zip member '/abs' is not a relative path"):
        assert part in str(err.value)
    assert counts() == (0, 0, 0)


def test_sync_refuses_a_real_bomb_over_the_configured_limit(db, tmp_path, settings):
    settings.KASA_RELEASE_MAX_UNPACKED_BYTES = 1 << 20
    folder, data = build(tmp_path, versions=("2.4.0",))
    make_zip(folder / "store-2.4.0.zip", {"store/zeros": bytes(3 << 20)})  # 3 MiB of zeros deflate to ~3 kB
    with pytest.raises(ReleaseInputError, match="would unpack to 3145728 bytes, more than the 1048576 allowed"):
        release_sync(folder)
    assert counts() == (0, 0, 0)


def test_a_registered_version_with_a_different_zip_is_refused(db, tmp_path):
    folder, data = build(tmp_path)
    release_sync(folder)
    before = counts()
    make_zip(folder / "backend-2.4.0.zip", component_files("backend", "2.4.0", "rebuilt"))
    data["backend"].append({"version": "2.6.0", "file": "backend-2.4.0.zip"})  # a new version in the same file
    save(folder, data)
    code, doc = command("release_sync", str(folder))
    assert code == 2
    assert "backend 2.4.0 is already registered with sha256" in doc["error"] and "immutable" in doc["error"]
    assert counts() == before and not ComponentVersion.objects.filter(version="2.6.0").exists()


def test_a_registered_release_with_other_versions_is_refused(db, tmp_path):
    folder, data = build(tmp_path)
    release_sync(folder)
    data["compatMatrix"][1]["store"] = "2.4.0"
    save(folder, data)
    with pytest.raises(ReleaseInputError, match="release '2.5.0' is already registered as admin 2.5.0, backend "
                                                "2.5.0, store 2.5.0, not admin 2.5.0, backend 2.5.0, store 2.4.0"):
        release_sync(folder)


def test_release_list_json_lists_releases_newest_in_semver_order(db, tmp_path):
    folder, data = build(tmp_path, versions=("2.9.0", "2.10.0", "2.10.0-rc.1"))
    data["compatMatrix"][2]["release"] = "2.10 candidate"
    save(folder, data)
    code, synced = command("release_sync", str(folder / "releases.json"))
    assert code == 0 and synced["releases_created"] == ["2.9.0", "2.10.0", "2.10 candidate"]
    code, doc = command("release_list")
    assert code == 0
    assert [r["name"] for r in doc["releases"]] == ["2.10.0", "2.10 candidate", "2.9.0"]
    first = doc["releases"][0]
    assert set(first) == {"name", "notes", "created_at", "synced_from", "components"}
    assert [c["component"] for c in first["components"]] == ["admin", "backend", "store"]
    assert {"component", "version", "sha256", "size", "file", "requires", "hooks"} <= set(first["components"][0])
    backend = [cv for cv in doc["component_versions"] if cv["component"] == "backend"]
    assert [cv["version"] for cv in backend] == ["2.10.0", "2.10.0-rc.1", "2.9.0"]
    assert backend[0]["sha256"] == sha(folder / "backend-2.10.0.zip") and backend[0]["releases"] == ["2.10.0"]


def test_releases_for_applies_requires_to_the_customers_current_versions(db, tmp_path):
    folder, data = build(tmp_path, versions=("2.3.0", "2.4.0", "2.5.0", "3.0.0"))
    data["backend"][2]["requires"] = {"from": ">=2.4.0"}
    data["backend"][3]["requires"] = {"from": "^2.5", "store": ">=2.5.0"}
    save(folder, data)
    release_sync(folder)
    offers = {rel.name: (allowed, why) for rel, allowed, why in
              releases_for({"backend": "2.4.0", "admin": "2.4.0", "store": "2.4.0"})}
    assert list(offers) == ["3.0.0", "2.5.0", "2.4.0", "2.3.0"]
    assert offers["2.5.0"] == (True, "admin 2.4.0 → 2.5.0, backend 2.4.0 → 2.5.0, store 2.4.0 → 2.5.0")
    assert offers["3.0.0"] == (False, "backend 3.0.0 needs backend ^2.5 (the customer has 2.4.0); "
                                      "backend 3.0.0 needs store >=2.5.0 (the customer has 2.4.0)")
    assert offers["2.4.0"] == (False, "already installed")
    assert offers["2.3.0"][0] is False and "backend would go down from 2.4.0 to 2.3.0" in offers["2.3.0"][1]
    at_25 = {rel.name: allowed for rel, allowed, _ in releases_for({"backend": "2.5.0", "admin": "2.5.0",
                                                                     "store": "2.5.0"})}
    assert at_25["3.0.0"] is True
    unknown = {rel.name: why for rel, _, why in releases_for({"admin": "2.4.0"})}
    assert "needs backend >=2.4.0 but the customer has no backend version recorded" in unknown["2.5.0"]


def test_component_zip_copy_checks_the_stored_bytes(db, tmp_path):
    folder, _ = build(tmp_path, versions=("2.4.0",))
    release_sync(folder)
    cv = ComponentVersion.objects.get(component="admin")
    dest = tmp_path / "dest"
    dest.mkdir()
    copy = component_zip_copy(cv, dest)
    assert copy.read_bytes() == (folder / "admin-2.4.0.zip").read_bytes()
    cv.sha256 = "f" * 64  # the registry and the stored bytes disagree
    with pytest.raises(ReleaseStorageError, match="not the registered"):
        component_zip_copy(cv, dest)
    assert not copy.exists()


# --- admin ---------------------------------------------------------------------------------------------------------
def _upload(client, folder: Path, names):
    files = [open(folder / n, "rb") for n in names]
    try:
        with open(folder / "releases.json", "rb") as js:
            return client.post(reverse("admin:releases_release_upload"), {"releases_json": js, "zips": files})
    finally:
        for f in files:
            f.close()


def test_admin_upload_imports_for_a_superuser(db, tmp_path, client, django_user_model):
    admin_user = django_user_model.objects.create_superuser("root-rel", password="pw-Secret-123")
    client.force_login(admin_user)
    changelist = client.get(reverse("admin:releases_release_changelist"))
    assert changelist.status_code == 200 and b"Upload releases" in changelist.content
    assert client.get(reverse("admin:releases_release_upload")).status_code == 200
    folder, _ = build(tmp_path)
    response = _upload(client, folder, sorted(p.name for p in folder.glob("*.zip")))
    assert response.status_code == 302, response.content.decode()[:2000]
    assert counts() == (6, 2, 6)
    entry = AuditEntry.objects.get(action="release.upload")
    assert entry.source == "admin" and entry.actor == admin_user and entry.result == "ok"
    with CaptureQueriesContext(connection) as queries:
        assert client.get(reverse("admin:releases_release_changelist")).status_code == 200
        assert client.get(reverse("admin:releases_componentversion_changelist")).status_code == 200
    assert len(queries) < 20, [q["sql"] for q in queries]  # prefetched: no query per row
    page = client.get(reverse("admin:releases_componentversion_changelist")).content.decode()
    assert "2.5.0" in page and ComponentVersion.objects.first().sha256[:16] in page
    release = Release.objects.get(name="2.5.0")
    detail = client.get(reverse("admin:releases_release_change", args=[release.pk])).content.decode()
    assert "backend <code>2.5.0</code>" in detail and 'name="_save"' not in detail  # read-only
    cv = ComponentVersion.objects.get(component="backend", version="2.5.0")
    detail = client.get(reverse("admin:releases_componentversion_change", args=[cv.pk])).content.decode()
    assert cv.sha256 in detail and "migrate" in detail and "DATABASE_URL" in detail


def test_admin_upload_shows_the_refusal_and_imports_nothing(db, tmp_path, client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root-rel2", password="pw-Secret-123"))
    folder, _ = build(tmp_path)
    zips = sorted(p.name for p in folder.glob("*.zip"))
    response = _upload(client, folder, [n for n in zips if n != "store-2.5.0.zip"])
    assert response.status_code == 400
    text = response.content.decode()
    assert "store 2.5.0: zip &#x27;store-2.5.0.zip&#x27; not found among the uploaded files" in text
    make_zip(folder / "extra.zip", {"a": "b"})
    response = _upload(client, folder, [*zips, "extra.zip"])
    assert response.status_code == 400 and "extra.zip was uploaded but releases.json does not name it" in \
        response.content.decode()
    assert counts() == (0, 0, 0)
    assert AuditEntry.objects.filter(action="release.upload", result__startswith="refused").count() == 2


def test_admin_upload_is_refused_without_staff_or_permission(db, tmp_path, client, django_user_model, staff_user):
    folder, _ = build(tmp_path, versions=("2.4.0",))
    zips = sorted(p.name for p in folder.glob("*.zip"))
    client.force_login(django_user_model.objects.create_user("plain-rel", password="pw-Secret-123"))
    response = _upload(client, folder, zips)
    assert response.status_code == 302 and "/login/" in response["Location"]
    client.force_login(staff_user())  # staff, operator group, but not releases.add_release
    assert client.get(reverse("admin:releases_release_upload")).status_code == 403
    assert _upload(client, folder, zips).status_code == 403
    assert counts() == (0, 0, 0)


# --- the documented example ----------------------------------------------------------------------------------------
def test_the_documented_example_builds_and_imports(db, tmp_path):
    example = Path(settings.BASE_DIR) / "docs" / "releases-example"
    out = tmp_path / "example"
    subprocess.run([sys.executable, str(example / "build.py"), str(out)], check=True, capture_output=True,
                   timeout=60)
    shutil.copy(example / "releases.json", out / "releases.json")
    result = release_sync(out / "releases.json")
    assert result.releases_created == ["2.4.0", "2.5 spring"] and len(result.versions_created) == 6
    offers = [(rel.name, allowed) for rel, allowed, _ in releases_for({"backend": "2.4.0", "admin": "2.4.0",
                                                                       "store": "2.4.0"})]
    assert offers == [("2.5 spring", True), ("2.4.0", False)]
    backend = ComponentVersion.objects.get(component="backend", version="2.5.0")
    assert backend.root == "backend" and backend.env_example == ["PORT", "DATABASE_URL", "SESSION_SECRET"]
    rebuilt = tmp_path / "rebuilt"  # fixed timestamps: a rebuild gives the same bytes, so a re-sync changes nothing
    subprocess.run([sys.executable, str(example / "build.py"), str(rebuilt)], check=True, capture_output=True,
                   timeout=60)
    assert sha(rebuilt / "backend-2.5.0.zip") == backend.sha256
