"""Secrets: encrypted at rest, write-only in the admin, never in argv, logs or output."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import override_settings

from core.secrets import SealedSecret, box
from customers.models import DatabaseConnection
from engines import dbprobe
from operations.context import RunContext
from operations.models import Run, RunCommand, RunLogLine

KEY_NEW = "n" * 48


def _raw_password(db_id: int) -> str:
    with connection.cursor() as cur:
        cur.execute("SELECT password FROM customers_databaseconnection WHERE id = %s", [db_id])
        return cur.fetchone()[0]


@pytest.mark.smoke
@pytest.mark.django_db
def test_database_password_is_encrypted_at_rest(make_customer):
    customer = make_customer(databases=[("main", "postgresql://shop:Sup3r-Secret@127.0.0.1:5432/shop")])
    db = customer.databases.get()
    raw = _raw_password(db.pk)
    assert "Sup3r-Secret" not in raw and raw.startswith("gAAAA")  # a Fernet token
    assert isinstance(db.password, SealedSecret)
    assert db.password.reveal() == "Sup3r-Secret"
    assert "Sup3r-Secret" not in f"{db.password} {db.password!r}"


@pytest.mark.django_db
def test_admin_never_renders_a_stored_secret_and_empty_keeps_it(client, admin_user, make_customer):
    customer = make_customer(databases=[("main", "postgresql://shop:Sup3r-Secret@127.0.0.1:5432/shop")])
    db = customer.databases.get()
    token = _raw_password(db.pk)
    client.force_login(admin_user)
    url = f"/customers/customer/{customer.pk}/change/"
    html = client.get(url).content.decode()
    assert "Sup3r-Secret" not in html and token not in html
    assert 'type="password"' in html

    # Saving the form with the password field empty keeps the stored secret.
    page = client.get(url)
    form = page.context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if not isinstance(v, (list, dict))}
    data["versions"] = "{}"
    data.update(_inline_management(page, customer))
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    assert _raw_password(db.pk) == token

    data["databases-0-password"] = "N3w-Secret"
    assert client.post(url, data).status_code == 302
    db.refresh_from_db()
    assert db.password.reveal() == "N3w-Secret"
    assert "N3w-Secret" not in client.get(url).content.decode()


def _inline_management(page, customer) -> dict:
    data = {}
    for formset in page.context["inline_admin_formsets"]:
        fs = formset.formset
        prefix = fs.prefix
        data[f"{prefix}-TOTAL_FORMS"] = str(len(fs.forms))
        data[f"{prefix}-INITIAL_FORMS"] = str(fs.initial_form_count())
        data[f"{prefix}-MIN_NUM_FORMS"] = "0"
        data[f"{prefix}-MAX_NUM_FORMS"] = "1000"
        for i, f in enumerate(fs.forms):
            for name, field in f.fields.items():
                value = f.initial.get(name, field.initial)
                if name == "password":
                    value = ""
                elif hasattr(value, "pk"):
                    value = value.pk
                elif isinstance(value, list):
                    value = __import__("json").dumps(value)
                data[f"{prefix}-{i}-{name}"] = "" if value is None else value
            data[f"{prefix}-{i}-customer"] = customer.pk
    return data


def _spy_cmdline(seen: dict, program: str):
    """on_start callback: read the child's argv and environment from /proc while it runs.

    Debian's /usr/bin/psql is a Perl wrapper that execs the real client, so we
    poll until the real program shows up and keep every argv we saw on the way.
    """

    def on_start(pid: int) -> None:
        seen.setdefault("cmdlines", [])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                env = Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode()
            except FileNotFoundError:
                break
            if cmd:
                seen["cmdlines"].append(cmd)
                seen["environ"] = env
                if program in cmd.split(" ")[0] and "perl" not in cmd.split(" ")[0]:
                    seen["cmdline"] = cmd
                    return
            time.sleep(0.005)

    return on_start


def _spying_runner(ctx: RunContext, seen: dict, program: str):
    def run(argv, **kw):
        return ctx.command(argv, on_start=_spy_cmdline(seen, program), **kw)

    return run


@pytest.mark.django_db(transaction=True)
def test_postgres_password_absent_from_child_argv_environment_and_logs(make_customer, pg_database, caplog):
    customer = make_customer(databases=[("main", pg_database["url"])])
    password = customer.databases.get().password.reveal()
    assert password == pg_database["password"]
    run = Run.objects.create(customer=customer, kind="check", mutating=False, status="running")
    ctx = RunContext(run)
    seen: dict = {}
    res = dbprobe.probe_postgresql(
        host=pg_database["host"], port=pg_database["port"], user=pg_database["user"], password=password,
        dbname=pg_database["name"], runner=_spying_runner(ctx, seen, "psql"), sql="SELECT pg_sleep(0.5), version()",
    )
    assert "PostgreSQL" in res.server_version
    assert "psql" in seen["cmdline"]
    assert all(password not in cmd for cmd in seen["cmdlines"])
    assert password not in seen["environ"] and "PGPASSWORD" not in seen["environ"]
    assert "PGPASSFILE=" in seen["environ"]
    _assert_nowhere(password, run, caplog)


@pytest.mark.django_db(transaction=True)
def test_mysql_password_absent_from_child_argv_environment_and_logs(make_customer, mysql_database, caplog):
    m = mysql_database
    run_customer = make_customer()
    run = Run.objects.create(customer=run_customer, kind="check", mutating=False, status="running")
    ctx = RunContext(run)
    seen: dict = {}
    res = dbprobe.probe_mysql(
        host=m["host"], port=m["port"], user=m["user"], password=m["password"], dbname=m["name"],
        runner=_spying_runner(ctx, seen, "mariadb"), sql="SELECT SLEEP(0.5), VERSION()",
    )
    assert "MariaDB" in res.server_version
    assert "--defaults-extra-file=" in seen["cmdline"]
    assert all(m["password"] not in cmd for cmd in seen["cmdlines"]) and m["password"] not in seen["environ"]
    _assert_nowhere(m["password"], run, caplog)


def _assert_nowhere(password: str, run: Run, caplog) -> None:
    for text in RunLogLine.objects.filter(run=run).values_list("text", flat=True):
        assert password not in text
    for argv in RunCommand.objects.filter(run=run).values_list("argv", flat=True):
        assert password not in " ".join(argv)
    assert password not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_check_on_a_worker_leaks_no_password_to_logs_results_or_output(make_customer, mysql_database, worker):
    from customers.services import customer_check_start
    from tests.conftest import wait_for_run

    m = mysql_database
    url = f"mysql://{m['user']}:{_urlquote(m['password'])}@{m['host']}:{m['port']}/{m['name']}"
    customer = make_customer(databases=[("main", url)])
    run = wait_for_run(customer_check_start(customer, via="cli").pk)
    assert run.status == "succeeded", run.error
    everything = " ".join([
        worker.output(), str(run.result), run.error,
        *RunLogLine.objects.filter(run=run).values_list("text", flat=True),
        *(" ".join(a) for a in RunCommand.objects.filter(run=run).values_list("argv", flat=True)),
    ])
    assert m["password"] not in everything
    out = subprocess.run([sys.executable, "manage.py", "customer_list", "--json"], capture_output=True, text=True,
                         env=worker.env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert m["password"] not in out.stdout + out.stderr and '"has_password": true' in out.stdout


def _urlquote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


@pytest.mark.smoke
@pytest.mark.django_db
def test_rotate_secrets_reencrypts_under_the_newest_key(make_customer, settings):
    customer = make_customer(databases=[("main", "postgresql://shop:Rot8-me@127.0.0.1:5432/shop")])
    db = customer.databases.get()
    old_token = _raw_password(db.pk)
    old_key = settings.KASA_SECRET_KEYS
    with override_settings(KASA_SECRET_KEYS=f"{KEY_NEW},{old_key}"):
        call_command("rotate_secrets", "--json")
        new_token = _raw_password(db.pk)
        assert new_token != old_token
        assert box().is_current(new_token)
    with override_settings(KASA_SECRET_KEYS=KEY_NEW):  # the old key can now be dropped
        assert DatabaseConnection.objects.get(pk=db.pk).password.reveal() == "Rot8-me"


@pytest.mark.smoke
@pytest.mark.django_db
def test_a_removed_key_gives_a_clear_error_not_a_leak(make_customer):
    customer = make_customer(databases=[("main", "postgresql://shop:Lost-key@127.0.0.1:5432/shop")])
    with override_settings(KASA_SECRET_KEYS=KEY_NEW):
        with pytest.raises(Exception) as err:
            customer.databases.get().password.reveal()
    assert "rotate_secrets" in str(err.value) and "Lost-key" not in str(err.value)


def test_psql_and_mysql_clients_exist():
    from tests.conftest import require

    require(shutil.which("psql") and (shutil.which("mariadb") or shutil.which("mysql")), "database clients")
