from django.db.models import Count

from core.cli import KasaCommand
from engines.humanize import human_size as size
from hosts.models import Host
from hosts.services import host_describe


class Command(KasaCommand):
    help = "List hosts with what their last probe found (never a private key)."

    def handle(self, *args, **o):
        hosts = Host.objects.annotate(customer_count=Count("customers"))
        docs = [{**host_describe(h), "customers": h.customer_count} for h in hosts]
        if self.json_output:
            self.emit(docs)
            return
        for h, d in zip(hosts, docs, strict=True):
            state = {True: "reachable", False: "UNREACHABLE", None: "not probed"}[d["reachable"]]
            if not d["enabled"]:
                state += ", disabled"
            if d["tunnel"]:
                state += ", via tunnel"
            if d["db_client_tools"] == Host.DbTools.HOST and not d["local"]:
                state += ", host's pg_dump"
            free = size(d["free_bytes"]) if d["free_bytes"] is not None else "-"
            self.stdout.write(f"{h.name:<20} {d['ssh'] or '(this machine)':<32} {state:<24} customers="
                              f"{d['customers']} free={free} os={d['os'] or '-'}")
