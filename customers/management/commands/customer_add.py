from django.conf import settings

from core.cli import BadInput, KasaCommand
from customers.models import Team
from customers.services import (
    CustomerInputError,
    customer_create,
    customer_describe,
    parse_database_spec,
    parse_service_spec,
)
from engines import dburl
from hosts.models import Host


class Command(KasaCommand):
    help = "Register a customer instance: its root folder, services and databases."

    def add_arguments(self, parser):
        parser.add_argument("domain")
        parser.add_argument("--root", required=True,
                            help=f"folder inside {settings.KASA_CUSTOMERS_ROOT} (with --host: inside that host's "
                                 "customers root)")
        parser.add_argument("--name", default="")
        parser.add_argument("--service", action="append", default=[], metavar="NAME[=RELPATH]")
        parser.add_argument("--database", action="append", default=[], metavar="[NAME=]URL",
                            help="postgresql://user:pass@host:port/db, mysql://…, sqlite:////abs/path.db")
        parser.add_argument("--version", dest="versions", action="append", default=[],
                            metavar="COMPONENT=VERSION")
        parser.add_argument("--team", default="", help="team name (created if missing; default: Default)")
        parser.add_argument("--tag", action="append", default=[], help="a tag for rollouts (repeat), e.g. canary")
        parser.add_argument("--host", default="", help="the host the customer lives on (default: local)")

    def handle(self, *args, **o):
        try:
            services = [parse_service_spec(s) for s in o["service"]]
            databases = [parse_database_spec(d, i) for i, d in enumerate(o["database"])]
        except dburl.DatabaseURLError as exc:
            raise BadInput(f"--database: {exc}") from None
        versions = {}
        for spec in o["versions"]:
            comp, sep, ver = spec.partition("=")
            if not sep or not comp or not ver:
                raise BadInput(f"--version {spec!r}: use COMPONENT=VERSION")
            versions[comp.strip()] = ver.strip()
        host = None
        if o["host"]:
            host = Host.objects.filter(name=o["host"]).first()
            if host is None:
                raise BadInput(f"--host: no host named {o['host']!r} (host_list shows them)")
        team, _ = Team.objects.get_or_create(name=o["team"] or "Default")
        try:
            customer = customer_create(domain=o["domain"], root=o["root"], name=o["name"], team=team,
                                       services=services, databases=databases, versions=versions,
                                       tags=",".join(o["tag"]), host=host)
        except CustomerInputError as exc:
            raise BadInput(str(exc)) from None
        if self.json_output:
            self.emit(customer_describe(customer))
        else:
            self.stdout.write(f"added {customer.domain} ({len(services)} services, {len(databases)} databases)")
