from core.cli import BadInput, KasaCommand
from engines.humanize import human_size as size
from hosts.models import Host
from hosts.services import host_describe, host_probe


class Command(KasaCommand):
    help = "Probe a host now: reachability, OS, free space under its customers root, tool versions. Exit 1 when " \
           "it is unreachable."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, *args, **o):
        host = Host.objects.filter(name=o["name"]).first()
        if host is None:
            raise BadInput(f"no host named {o['name']!r}")
        host = host_probe(host)
        doc = host_describe(host)
        if not host.reachable:
            self.fail(host.last_error, {**doc, "error": host.last_error, "exit_code": 1})
        if self.json_output:
            self.emit(doc)
            return
        free = size(host.free_bytes) if host.free_bytes is not None else "unknown"
        self.stdout.write(f"{host.name}: reachable; {host.os or 'OS unknown'}; {free} free under {host.root()}")
        self.stdout.write("tools: " + host.tool_summary())
        if host.last_error:
            self.stdout.write(f"warning: {host.last_error}")
