"""Roots never overlap (issue 11, point 3): no customer's root may be, hold or lie inside another customer's root
(resolved real paths, links followed), whichever way it is set — customer_add, the admin, restore --to-root — and
an operation checks again right before it starts, because a folder can become a link on disk after it was
validated. Real folders, the real commands and admin pages, the local storage target."""

from __future__ import annotations

import shutil
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings

from backups.models import Backup, StorageTarget
from customers.models import Customer, Team
from operations.models import Run
from tests.restore_helpers import command_json
from tests.test_backups import _backup_json

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "beta-Secret-" + uuid.uuid4().hex


@pytest.fixture
def folders():
    """Fresh folders inside KASA_CUSTOMERS_ROOT, removed afterwards."""
    made = []

    def make(name: str) -> Path:
        path = Path(settings.KASA_CUSTOMERS_ROOT) / f"{name}-{uuid.uuid4().hex[:8]}"
        made.append(path)
        return path

    yield make
    for path in made:
        if path.is_symlink():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def beta(make_customer, folders):
    """Another team's customer, with a secret in its .env."""
    root = folders("beta")
    (root / "backend").mkdir(parents=True)
    (root / "backend" / ".env").write_text(f"API_SECRET={SECRET}\n")
    return make_customer(f"beta-{uuid.uuid4().hex[:6]}.example.com", root=root, services=("backend",),
                         team_=Team.objects.create(name=f"beta-{uuid.uuid4().hex[:6]}"))


def customer_add(domain: str, root) -> tuple[int, dict]:
    return command_json("customer_add", domain, "--root", str(root), "--team", "alpha")


def test_customer_add_refuses_a_second_customer_with_the_same_root(beta):
    code, doc = customer_add("alpha.example.com", beta.root)
    assert code == 2 and "is another customer's root folder" in doc["error"], doc
    code, doc = customer_add("alpha.example.com", beta.root + "/")
    assert code == 2, doc
    assert not Customer.objects.filter(domain="alpha.example.com").exists()


def test_customer_add_refuses_a_root_inside_another_customers_root_or_around_it(beta, folders):
    code, doc = customer_add("inside.example.com", Path(beta.root) / "backend")
    assert code == 2 and "lies inside another customer's root folder" in doc["error"], doc
    code, doc = customer_add("around.example.com", Path(beta.root).parent)
    assert code == 2, doc  # KASA_CUSTOMERS_ROOT itself: refused as the base folder
    outer = folders("outer")
    (outer / "inner").mkdir(parents=True)
    inner = Customer.objects.create(domain=f"inner-{uuid.uuid4().hex[:6]}.example.com", root=str(outer / "inner"),
                                    team=beta.team)  # a customer one level down (created without validation)
    code, doc = customer_add("around.example.com", outer)
    assert code == 2 and "contains another customer's root folder" in doc["error"], doc
    link = folders("link")
    link.symlink_to(Path(beta.root) / "backend")  # a link is followed: its target is what counts
    code, doc = customer_add("linked.example.com", link)
    assert code == 2 and "lies inside another customer's root folder" in doc["error"], doc
    assert not Customer.objects.exclude(pk__in=[beta.pk, inner.pk]).exists()


class _Form(HTMLParser):
    """The values a browser would post back from the admin's change form, unchanged."""

    def __init__(self):
        super().__init__()
        self.data: dict[str, str] = {}
        self._select = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        name = a.get("name")
        if tag == "input" and name and a.get("type") not in ("submit", "button", "checkbox", "file"):
            self.data[name] = a.get("value") or ""
        elif tag == "input" and name and a.get("type") == "checkbox" and "checked" in a:
            self.data[name] = a.get("value") or "on"
        elif tag == "select" and name:
            self._select = name
            self.data.setdefault(name, "")
        elif tag == "option" and self._select and "selected" in a:
            self.data[self._select] = a.get("value") or ""
        elif tag == "textarea" and name:
            self._select = None
            self.data[name] = ""
            self._textarea = name

    def handle_data(self, data):
        if getattr(self, "_textarea", None):
            self.data[self._textarea] += data

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None
        if tag == "textarea":
            self._textarea = None


def test_the_admin_refuses_a_root_at_or_inside_another_teams_customer_folder(client, admin_user, beta, folders,
                                                                              make_customer):
    """Even a superuser's change form: the root of alpha's customer may not be beta's folder or lie inside it."""
    alpha_root = folders("alpha")
    alpha_root.mkdir()
    alpha = make_customer(f"alpha-{uuid.uuid4().hex[:6]}.example.com", root=alpha_root, services=())
    client.force_login(admin_user)
    url = f"/customers/customer/{alpha.pk}/change/"
    for root in (beta.root, str(Path(beta.root) / "backend")):
        form = _Form()
        form.feed(client.get(url).content.decode())
        response = client.post(url, {**form.data, "root": root, "_save": "Save"})
        html = response.content.decode()
        assert response.status_code == 200 and "another customer&#x27;s root folder" in html, html[-3000:]
        alpha.refresh_from_db()
        assert alpha.root == str(alpha_root)


def test_a_root_swapped_for_a_link_into_another_teams_folder_is_never_backed_up(beta, folders, make_customer,
                                                                                 tmp_path):
    """Alpha's root passed validation; then the folder becomes a link into beta's. The backup (unencrypted,
    uncompressed: beta's .env would be plain bytes on storage, ready to download) refuses before reading a file."""
    StorageTarget.objects.create(name="dr", kind="local", path=str(tmp_path / "dr"))
    alpha_root = folders("alpha")
    (alpha_root / "backend").mkdir(parents=True)
    alpha = make_customer(f"alpha-{uuid.uuid4().hex[:6]}.example.com", root=alpha_root, services=("backend",))
    shutil.rmtree(alpha_root)
    alpha_root.symlink_to(beta.root)
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError) as failed:
        call_command("backup", alpha.domain, "--target", "dr", "--no-encrypt", "--compression", "none",
                     "--scope", "full")
    assert failed.value.returncode == 1
    run = Run.objects.get(customer=alpha, kind="backup")
    assert run.status == "failed" and "another customer's root folder" in run.error, run.error
    assert not Backup.objects.filter(customer=alpha, status="succeeded").exists()
    stored = [p for p in (tmp_path / "dr").rglob("*") if p.is_file()]
    assert not any(SECRET.encode() in p.read_bytes() for p in stored), stored


def test_restore_to_root_never_writes_into_another_customers_folder(beta, folders, make_customer):
    alpha_root = folders("alpha")
    (alpha_root / "backend").mkdir(parents=True)
    (alpha_root / "backend" / "index.php").write_text("<?php echo 'alpha';\n")
    alpha = make_customer(f"alpha-{uuid.uuid4().hex[:6]}.example.com", root=alpha_root, services=("backend",))
    doc = _backup_json(alpha.domain, "--scope", "files")
    into = Path(beta.root) / "copy"
    code, out = command_json("restore", str(doc["id"]), "--to-root", str(into), "--yes")
    assert code == 2 and "another customer's root folder" in out["error"], out
    assert not into.exists()
    assert not Run.objects.filter(kind="restore").exists()


# --- the rules behind the attacks ------------------------------------------------------------------------------
def test_two_copies_into_one_folder_never_run_at_once(make_customer, folders):
    """One mutating run per folder (Run.root, a partial unique index): two customers' backups copied into the same
    --to-root at once would mix their files."""
    docs = []
    for name in ("one", "two"):
        root = folders(name)
        (root / "backend").mkdir(parents=True)
        customer = make_customer(f"{name}-{uuid.uuid4().hex[:6]}.example.com", root=root, services=("backend",))
        docs.append(_backup_json(customer.domain, "--scope", "files"))
    into = folders("copy")
    code, first = command_json("restore", str(docs[0]["id"]), "--to-root", str(into), "--yes", "--enqueue")
    assert code == 0, first
    code, second = command_json("restore", str(docs[1]["id"]), "--to-root", str(into), "--yes", "--enqueue")
    assert code == 2 and "cannot start restore" in second["error"], second
    assert Run.objects.filter(kind="restore").count() == 1
    Run.objects.get(pk=first["id"]).cancel()


def test_an_operation_refuses_a_service_folder_that_became_a_link_out_of_the_root(make_customer, folders,
                                                                                  tmp_path):
    root = folders("svc")
    (root / "backend").mkdir(parents=True)
    customer = make_customer(f"svc-{uuid.uuid4().hex[:6]}.example.com", root=root, services=("backend",))
    shutil.rmtree(root / "backend")
    (root / "backend").symlink_to(tmp_path)
    code, doc = command_json("backup", customer.domain, "--scope", "files")
    assert code == 1 and "refused before touching anything" in doc["error"] and "outside" in doc["error"], doc
    assert not Backup.objects.filter(customer=customer).exists()


def test_a_sqlite_path_at_kasas_files_is_refused_also_on_a_customer_not_yet_saved(team):
    from django.core.exceptions import ValidationError

    from customers.models import DatabaseConnection

    root = Path(settings.KASA_CUSTOMERS_ROOT) / "unsaved"
    customer = Customer(domain="unsaved.example.com", root=str(root), team=team)
    db = DatabaseConnection(customer=customer, name="main", engine="sqlite",
                            sqlite_path=str(settings.KASA_VAR_DIR / "kasa.sqlite3"))
    with pytest.raises(ValidationError, match="SQLite path"):
        db.full_clean(exclude=["customer"])
    db.sqlite_path = str(root / "data.sqlite3")
    db.full_clean(exclude=["customer"])
