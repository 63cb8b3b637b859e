"""Pure engines, tested alone (no Django)."""

import os
import stat
import sys

import pytest

from engines import credentials, dburl, paths, proc, secretbox

pytestmark = pytest.mark.smoke

KEY_A = "a" * 40
KEY_B = "b" * 40


# --- secretbox -------------------------------------------------------------------
def test_secret_round_trips_and_never_shows_itself():
    box = secretbox.SecretBox(KEY_A)
    token = box.encrypt("hunter2-pass")
    assert "hunter2" not in token
    secret = box.decrypt(token)
    assert secret.reveal() == "hunter2-pass"
    for shown in (str(secret), repr(secret), f"{secret}", f"{secret:>20}", str([secret]), str({"p": secret})):
        assert "hunter2" not in shown


def test_rotation_decrypts_old_tokens_and_reencrypts_under_newest_key():
    old_token = secretbox.SecretBox(KEY_A).encrypt("s3cret")
    both = secretbox.SecretBox(f"{KEY_B},{KEY_A}")
    assert both.decrypt(old_token).reveal() == "s3cret"
    assert not both.is_current(old_token)
    new_token = both.rotate(old_token)
    assert both.is_current(new_token)
    assert secretbox.SecretBox(KEY_B).decrypt(new_token).reveal() == "s3cret"


def test_wrong_key_gives_clear_error_without_token_or_key():
    token = secretbox.SecretBox(KEY_A).encrypt("s3cret")
    with pytest.raises(secretbox.SecretDecryptError) as err:
        secretbox.SecretBox(KEY_B).decrypt(token)
    message = str(err.value)
    assert "KASA_SECRET_KEYS" in message and token not in message and KEY_B not in message


@pytest.mark.parametrize("keys", ["", " , ", "short-key", f"{KEY_A},tooshort"])
def test_short_or_missing_keys_are_refused(keys):
    with pytest.raises(secretbox.SecretKeyError):
        secretbox.SecretBox(keys)


def test_secrets_cannot_be_pickled():
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(secretbox.Secret("x"))


# --- paths -----------------------------------------------------------------------
def test_paths_inside_base_are_accepted(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert paths.resolve_inside("a/b", tmp_path) == (tmp_path / "a" / "b").resolve()
    assert paths.resolve_inside(str(tmp_path / "a"), tmp_path) == (tmp_path / "a").resolve()


@pytest.mark.parametrize("raw", ["../x", "a/../../x", "/etc", "a/../b"])
def test_parent_references_and_outside_paths_are_refused(tmp_path, raw):
    with pytest.raises(paths.PathEscapeError):
        paths.resolve_inside(raw, tmp_path / "base")


def test_symlink_escape_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "outside").mkdir()
    (base / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(paths.PathEscapeError, match="outside"):
        paths.resolve_inside("link/data", base)


def test_base_itself_is_not_strictly_inside(tmp_path):
    with pytest.raises(paths.PathEscapeError):
        paths.resolve_strictly_inside(str(tmp_path), tmp_path)


def test_relative_paths_are_normalised_and_checked():
    assert paths.relative_inside("backend/./app") == "backend/app"
    for bad in ("/abs", "../up", "", "a/../../b"):
        with pytest.raises(paths.PathEscapeError):
            paths.relative_inside(bad)


# --- proc ------------------------------------------------------------------------
def test_command_output_streams_line_by_line_with_secrets_masked():
    seen = []
    res = proc.run(
        [sys.executable, "-c", "import sys; print('one TOPSECRET'); print('two', file=sys.stderr); print('three')"],
        secrets=["TOPSECRET"], on_line=lambda s, line: seen.append((s, line)),
    )
    assert res.ok and res.exit_code == 0 and res.duration >= 0
    assert ("stdout", "one ********") in seen and ("stderr", "two") in seen and ("stdout", "three") in seen
    assert all("TOPSECRET" not in line for _, line in seen)


def test_shell_strings_are_refused():
    with pytest.raises(TypeError):
        proc.run("echo hi")


def test_missing_program_and_timeout_are_clear_errors():
    with pytest.raises(proc.CommandNotFound, match="no-such-program-kasa"):
        proc.run(["no-such-program-kasa"])
    with pytest.raises(proc.CommandTimeout, match="did not finish"):
        proc.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


def test_failing_command_reports_its_last_error_line():
    res = proc.run([sys.executable, "-c", "import sys; sys.stderr.write('boom happened\\n'); sys.exit(3)"])
    assert res.exit_code == 3 and res.last_error_line() == "boom happened"


def test_argv_is_masked_in_the_result():
    res = proc.run([sys.executable, "-c", "pass", "--token=abc123"], secrets=["abc123"])
    assert res.argv[-1] == "--token=********"


# --- dburl -----------------------------------------------------------------------
def test_database_urls_parse_all_engines():
    pg = dburl.parse("postgresql://u:p%40ss@db.example.com:6543/shop")
    assert (pg.engine, pg.host, pg.port, pg.name, pg.user, pg.password) == (
        "postgresql", "db.example.com", 6543, "shop", "u", "p@ss")
    assert dburl.parse("postgres://u@h/db").port == 5432
    my = dburl.parse("mariadb://u:p@h/db")
    assert (my.engine, my.port) == ("mysql", 3306)
    assert dburl.parse("sqlite:////srv/app/db.sqlite3").path == "/srv/app/db.sqlite3"


@pytest.mark.parametrize("url", [
    "oracle://u:p@h/db", "postgresql://u:p@h", "postgresql://u:p@h:notaport/db", "not a url",
    "sqlite:///relative.db", "sqlite://host/abs.db", "mysql://u:p@/db",
])
def test_bad_database_urls_are_refused_without_echoing_the_password(url):
    with pytest.raises(dburl.DatabaseURLError) as err:
        dburl.parse(url)
    assert ":p@" not in str(err.value)


def test_display_masks_the_password():
    assert "pw" not in dburl.parse("postgresql://u:pw@h/db").display()


# --- credentials -----------------------------------------------------------------
def test_pgpass_file_is_private_escaped_and_removed(tmp_path):
    with credentials.pg_env(host="h", port=5432, user="u", password="a:b\\c") as env:
        path = env["PGPASSFILE"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert open(path).read() == "*:*:*:u:a\\:b\\\\c\n"
        assert "PGPASSWORD" not in env
    assert not os.path.exists(path)


def test_without_a_password_libpq_gets_an_empty_private_file_not_dev_null():
    """/dev/null makes psql warn that the password file "is not a plain file" (Kasa's fault, not the customer's)."""
    with credentials.pg_env(host="h", port=5432, user="u", password="") as env:
        path = env["PGPASSFILE"]
        assert path != os.devnull and stat.S_IMODE(os.stat(path).st_mode) == 0o600 and open(path).read() == ""
    assert not os.path.exists(path)


def test_mysql_defaults_file_is_private_and_removed():
    with credentials.mysql_defaults_file(host="h", port=3306, user="u", password='p"q') as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert 'password="p\\"q"' in open(path).read()
    assert not os.path.exists(path)


# --- sources.outward_links: the links a restore would refuse, as GNU tar archives the folder -----------
def _dir_info(name: str):
    import tarfile

    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def test_outward_links_are_exactly_the_archived_links_a_restore_refuses(tmp_path):
    import io
    import subprocess
    import tarfile

    from engines import sources, tarcheck

    svc = tmp_path / "backend"
    for rel in ("src/lib", "logs", "bad/cache", "blogs", "tmp/x", "deep/tmp"):
        (svc / rel).mkdir(parents=True)
    links = {
        "src/current": "lib",                      # inside
        "src/lib/up": "../../src",                 # climbs, stays inside
        "src/python": "/usr/bin/python3",          # absolute
        "src/out": "../../../elsewhere",           # climbs out of the customer's root
        "sibling": "../admin/shared",              # into a sibling folder: kept inside the root
        "logs/now": "/var/log",                    # excluded: logs
        "bad/cache/c": "/tmp",                     # excluded: b*d/cache (a pattern with '/')
        "blogs/b": "/srv",                         # excluded: b*s matches the whole name backend/blogs
        "tmp/x/t": "/opt",                         # excluded: backend/tmp, anchored at the top
        "deep/tmp/d": "/etc",                      # kept: backend/tmp does not name deep/tmp
    }
    for rel, target in links.items():
        (svc / rel).symlink_to(target)
    excludes = ["logs", "b*d/cache", "b*s", "backend/tmp"]

    stage = sources.tar_stage(str(tmp_path), ["backend"], excludes=excludes)  # what a backup runs
    archive = subprocess.run(stage.argv, capture_output=True, check=True).stdout
    archived = [m for m in tarfile.open(fileobj=io.BytesIO(archive)) if m.issym()]
    refused = set()
    for member in archived:  # what the restore's own checker says of each archived link, with its folders
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as one:
            parts = member.name.split("/")
            for k in range(1, len(parts)):
                one.addfile(_dir_info("/".join(parts[:k])))
            one.addfile(member)
        try:
            scanner = tarcheck.TarScanner("one.tar")
            scanner.feed(buf.getvalue())
            scanner.finish()
        except tarcheck.ArchiveRefused:
            refused.add((member.name, member.linkname))

    assert set(sources.outward_links(str(tmp_path), "backend", excludes=excludes)) == refused
    assert refused == {("backend/src/python", "/usr/bin/python3"), ("backend/src/out", "../../../elsewhere"),
                       ("backend/deep/tmp/d", "/etc")}
