"""The check operation against real PostgreSQL, MariaDB and SQLite, and the CLI around it."""

import json
import sqlite3
import subprocess
import sys

import pytest

from customers.services import customer_check_start
from operations.models import RunCommand
from operations.services import run_execute
from tests.conftest import free_port


def _check(customer):
    run = customer_check_start(customer, via="cli")
    run_execute(run.pk)  # same code path as the worker, in-process
    run.refresh_from_db()
    return run


@pytest.mark.django_db(transaction=True)
def test_check_reports_postgresql_server_version_and_records_the_command(make_customer, pg_database):
    run = _check(make_customer(databases=[("main", pg_database["url"])]))
    assert run.status == "succeeded", run.error
    db = run.result["databases"][0]
    assert db["ok"] and db["server_version"].startswith(("15", "16", "17", "18"))
    from engines.sources import pg_tools

    assert db["client_version"] == pg_tools("pg_dump")[0][2]  # the pg_dump backups will use, not PATH's
    cmd = RunCommand.objects.get(run=run)
    assert cmd.argv[0].endswith("psql") and cmd.exit_code == 0 and cmd.duration is not None
    assert pg_database["password"] not in json.dumps(cmd.argv)
    assert run.log_lines.filter(command=cmd, stream="stdout").exists()


@pytest.mark.django_db(transaction=True)
def test_check_reports_mariadb_server_version(make_customer, mysql_database):
    from urllib.parse import quote

    m = mysql_database
    url = f"mysql://{m['user']}:{quote(m['password'], safe='')}@{m['host']}:{m['port']}/{m['name']}"
    run = _check(make_customer(databases=[("main", url)]))
    assert run.status == "succeeded", run.error
    assert "MariaDB" in run.result["databases"][0]["server_version"]


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_check_reads_a_sqlite_database_inside_the_root_without_changing_it(make_customer, customer_root):
    path = customer_root / "backend" / "app.sqlite3"
    path.parent.mkdir(parents=True)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = path.read_bytes()
    run = _check(make_customer(databases=[("main", f"sqlite:///{path}")]))
    assert run.status == "succeeded", run.error
    assert run.result["databases"][0]["server_version"].startswith("SQLite 3.")
    assert path.read_bytes() == before


@pytest.mark.django_db(transaction=True)
def test_unreachable_database_fails_the_check_with_a_clear_message(make_customer):
    port = free_port()  # nothing listens there
    run = _check(make_customer(databases=[("main", f"postgresql://u:Hidden-pw@127.0.0.1:{port}/shop")]))
    assert run.status == "failed"
    assert f"database main: cannot connect to PostgreSQL at 127.0.0.1:{port}/shop" in run.error
    assert "Hidden-pw" not in run.error and "Hidden-pw" not in json.dumps(run.result)


@pytest.mark.django_db(transaction=True)
def test_wrong_mariadb_password_fails_without_showing_it(make_customer, mysql_database):
    m = mysql_database
    url = f"mysql://{m['user']}:Wrong-Pass-123@{m['host']}:{m['port']}/{m['name']}"
    run = _check(make_customer(databases=[("main", url)]))
    assert run.status == "failed" and "Access denied" in run.error
    assert "Wrong-Pass-123" not in run.error
    assert not run.log_lines.filter(text__contains="Wrong-Pass-123").exists()


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_check_reports_missing_folders_and_unhealthy_services(make_customer, customer_root):
    import shutil
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ok" else 500)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    customer = make_customer(services=("backend", "admin", "store"))
    customer.services.filter(name="backend").update(health_url=f"{base}/ok")
    customer.services.filter(name="admin").update(health_url=f"{base}/broken")
    shutil.rmtree(customer_root / "store")
    run = _check(customer)
    server.shutdown()
    assert run.status == "failed"
    by_name = {s["name"]: s for s in run.result["services"]}
    assert by_name["backend"]["ok"] and by_name["backend"]["health"]["status"] == 200
    assert not by_name["admin"]["ok"] and by_name["admin"]["health"]["status"] == 500
    assert not by_name["store"]["ok"] and "does not exist" in by_name["store"]["error"]
    assert "2 problem(s)" in run.error


# --- CLI contract -------------------------------------------------------------------
def _manage(env, *args, timeout=120):
    return subprocess.run([sys.executable, "manage.py", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.django_db(transaction=True)
def test_customer_check_cli_enqueue_wait_follows_the_worker_and_prints_one_json_document(
    make_customer, pg_database, worker
):
    customer = make_customer(databases=[("main", pg_database["url"])])
    out = _manage(worker.env, "customer_check", customer.domain, "--enqueue", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # stdout holds exactly one JSON document
    assert doc["status"] == "succeeded" and doc["customer"] == customer.domain
    assert doc["result"]["databases"][0]["ok"]
    assert "[info]" in out.stderr  # the live log goes to stderr


@pytest.mark.django_db(transaction=True)
def test_customer_check_cli_exits_1_when_the_check_fails_and_2_for_bad_input(make_customer, worker):
    customer = make_customer(databases=[("main", f"postgresql://u:p@127.0.0.1:{free_port()}/x")])
    out = _manage(worker.env, "customer_check", customer.domain, "--json")
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["status"] == "failed"
    out = _manage(worker.env, "customer_check", "nobody.example.com", "--json")
    assert out.returncode == 2 and "no customer" in json.loads(out.stdout)["error"]


@pytest.mark.django_db(transaction=True)
def test_customer_add_and_list_follow_the_cli_contract(subprocess_env, customer_root, pg_database):
    env = subprocess_env
    (customer_root / "api").mkdir()
    out = _manage(env, "customer_add", "Shop.Example.com", "--root", str(customer_root), "--name", "Shop",
                  "--service", "backend=api", "--service", "store", "--database", pg_database["url"],
                  "--database", f"cache=sqlite:///{customer_root}/cache.db", "--version", "backend=2.4.0",
                  "--team", "Blue", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["domain"] == "shop.example.com" and doc["team"] == "Blue"
    assert [s["path"] for s in doc["services"]] == ["api", "store"]
    assert {d["name"] for d in doc["databases"]} == {"main", "cache"}

    out = _manage(env, "customer_list", "--json")
    assert out.returncode == 0
    listed = json.loads(out.stdout)
    shop = next(c for c in listed if c["domain"] == "shop.example.com")
    assert shop["versions"] == {"backend": "2.4.0"}
    assert pg_database["password"] not in out.stdout


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("args, message", [
    (["--database", "postgresql://u:p@host:notaport/db"], "--database"),
    (["--database", "oracle://u:p@h/db"], "unknown database engine"),
    (["--root", "/etc"], "outside"),
    (["--root", "{root}/../../escape"], "'..'"),
    (["--service", "bad/../name"], "service"),
    (["--version", "backend"], "COMPONENT=VERSION"),
])
def test_customer_add_exits_2_on_bad_input_and_adds_nothing(subprocess_env, customer_root, args, message):
    from customers.models import Customer

    args = [a.replace("{root}", str(customer_root)) for a in args]
    if "--root" not in args:
        args = ["--root", str(customer_root), *args]
    out = _manage(subprocess_env, "customer_add", "bad.example.com", *args, "--json")
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in json.loads(out.stdout)["error"]
    assert ":p@" not in out.stdout + out.stderr
    assert not Customer.objects.filter(domain="bad.example.com").exists()


@pytest.mark.smoke
@pytest.mark.django_db
def test_root_through_a_symlink_out_of_the_customers_root_is_refused(customer_root, team, tmp_path):
    from customers.services import CustomerInputError, customer_create

    (customer_root / "link").symlink_to(tmp_path)
    with pytest.raises(CustomerInputError, match="outside"):
        customer_create(domain="sym.example.com", root=str(customer_root / "link"), team=team)


@pytest.mark.smoke
@pytest.mark.django_db
@pytest.mark.parametrize("domain", ["not a domain", "-bad.example.com", "x" * 300 + ".com", "nodots"])
def test_invalid_domains_are_refused(customer_root, team, domain):
    from customers.services import CustomerInputError, customer_create

    with pytest.raises(CustomerInputError, match="domain"):
        customer_create(domain=domain, root=str(customer_root), team=team)
