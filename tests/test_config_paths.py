"""More of the instance's configuration (issue 15, point 6): a policy's extra config paths (globs relative to the
root) go into the config artifact with the .env files and restore like them; the Restore page shows .env-like
ones masked key by key and the others as changed or unchanged, never their content."""

from __future__ import annotations

import os

import pytest
from django.core.exceptions import ValidationError

from backups.models import BackupPolicy
from backups.services import default_target
from engines import sources
from tests.restore_helpers import command_json

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "nginx-Secret-4b1d"
PATTERNS = ["station_info.json", "nginx/*.conf", "*.env", "linked/*.conf", "backend/extra/*.ini"]


@pytest.mark.parametrize(("pattern", "why"), [
    ("../other/station_info.json", "'..' component"), ("nginx/../../etc/passwd", "'..' component"),
    ("/etc/nginx/*.conf", "absolute"), ("~/x", "absolute"), ("", "non-empty"), ("**/*.conf", "'**'"),
    (".kasa-trash/x", ".kasa"), (3, "non-empty glob"),
])
def test_a_config_path_outside_the_root_is_refused_by_the_policy(make_customer, pattern, why):
    policy = BackupPolicy(customer=make_customer(), target=default_target(), config_paths=["ok.json", pattern])
    with pytest.raises(ValidationError) as refused:
        policy.full_clean()
    assert why in str(refused.value.message_dict["config_paths"])
    policy.config_paths = ["ok.json", "nginx/*.conf", "conf/*/app.yml"]
    policy.full_clean()


def test_the_policy_form_shows_the_extra_config_paths_with_help(admin_client):
    page = admin_client.get("/backups/backuppolicy/add/").content.decode()
    assert 'name="config_paths"' in page and "Extra config paths" in page and "nginx/*.conf" in page
    refused = admin_client.post("/backups/backuppolicy/add/", {"config_paths": '["../x"]'}).content.decode()
    assert "&#x27;..&#x27; component" in refused or "'..' component" in refused


def _instance(root) -> None:
    (root / "station_info.json").write_text('{"station": "north"}\n')
    (root / "nginx").mkdir()
    (root / "nginx" / "site.conf").write_text("server { listen 80; }\n")
    (root / "nginx" / "api.conf").write_text("server { listen 81; }\n")
    os.chmod(root / "nginx" / "api.conf", 0o600)
    (root / "nginx" / "readme.txt").write_text("not matched\n")
    (root / "nginx" / "evil.conf").symlink_to("/etc/hostname")  # a symlink matching a glob: never taken
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    (outside / "secret.conf").write_text("outside the root\n")
    (root / "linked").symlink_to(outside)  # a symlinked folder: what is behind it is not config
    (root / "prod.env").write_text(f"API_SECRET={SECRET}\nMODE=live\n")
    (root / "backend" / ".env").write_text("PORT=3000\n")
    (root / "backend" / "extra").mkdir()
    (root / "backend" / "extra" / "app.ini").write_text("[app]\n")  # inside a service folder: taken too
    (root / "backend" / "extra" / "caf\udce9.ini").write_bytes(b"not UTF-8 named\n")  # left out


def test_extra_config_paths_are_backed_up_and_restored_like_env_files(make_customer, customer_root, admin_client):
    customer = make_customer(services=("backend",))
    _instance(customer_root)
    BackupPolicy.objects.create(customer=customer, target=default_target(), config_paths=PATTERNS)
    before = {p: (customer_root / p).read_bytes() for p in ("station_info.json", "nginx/site.conf",
                                                              "nginx/api.conf", "prod.env")}

    code, doc = command_json("backup", customer.domain, "--scope", "config")
    assert code == 0 and doc["status"] == "succeeded", doc
    [config] = doc["artifacts"]
    assert config["files"] == ["backend/.env", "station_info.json", "nginx/api.conf", "nginx/site.conf", "prod.env",
                               "backend/extra/app.ini"]

    # After the backup: edited, removed, and the symlink pointed elsewhere.
    (customer_root / "station_info.json").write_text('{"station": "south"}\n')
    (customer_root / "nginx" / "site.conf").write_text("server { listen 8080; }\n")
    (customer_root / "nginx" / "api.conf").unlink()
    (customer_root / "prod.env").write_text("API_SECRET=changed-secret\nMODE=test\n")

    page = admin_client.get(f"/backups/backup/{doc['id']}/restore/").content.decode()
    diff = page[page.index('id="env-diff"'):page.index("<h2>Confirm</h2>")]
    assert SECRET not in page and "changed-secret" not in page and "server {" not in page and "north" not in page
    assert "<code>prod.env</code>" in diff and "MODE" in diff and "********" in diff  # masked, key by key
    station = diff[diff.index("<code>station_info.json</code>"):]
    assert "changed: the backup" in station.split("<h3>")[0]
    assert "unchanged" in diff[diff.index("<code>backend/extra/app.ini</code>"):].split("<h3>")[0]
    assert "does not exist now" in diff[diff.index("<code>nginx/api.conf</code>"):].split("<h3>")[0]

    code, run = command_json("restore", str(doc["id"]), "--only", "config", "--yes", "--no-safety-backup")
    assert code == 0 and run["status"] == "succeeded", run
    assert {p: (customer_root / p).read_bytes() for p in before} == before
    assert os.stat(customer_root / "nginx" / "api.conf").st_mode & 0o777 == 0o600
    assert os.readlink(customer_root / "nginx" / "evil.conf") == "/etc/hostname"
    assert (customer_root / "linked").is_symlink()


def test_config_members_takes_regular_files_only_and_never_follows_a_link(tmp_path):
    root = tmp_path / "root"
    (root / "backend").mkdir(parents=True)
    _instance(root)
    found = sources.config_members(str(root), ["backend"], PATTERNS)
    assert "nginx/evil.conf" not in found and not [f for f in found if f.startswith("linked/")]
    assert "nginx/readme.txt" not in found and "backend/extra/app.ini" in found
    with pytest.raises(sources.SourceError, match="'..' component"):
        sources.config_members(str(root), [], ["../x"])  # a host or a stale run's params are checked again


def test_a_config_file_whose_name_is_not_utf8_is_left_out_and_the_backup_succeeds(make_customer, customer_root):
    customer = make_customer(services=("backend",))
    (customer_root / "backend" / ".env").write_text("PORT=1\n")
    with open(os.fsencode(customer_root / "backend") + b"/.env.\xff", "wb") as fh:
        fh.write(b"X=1\n")
    code, doc = command_json("backup", customer.domain, "--scope", "config")
    assert code == 0 and doc["status"] == "succeeded", doc
    assert doc["artifacts"][0]["files"] == ["backend/.env"]
