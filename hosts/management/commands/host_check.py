from core.cli import BadInput, KasaCommand
from engines.humanize import human_size as size
from hosts.models import Host
from hosts.services import host_describe, host_journals_left, host_probe


class Command(KasaCommand):
    help = "Probe a host now: reachability, OS, free space under its customers root, tool versions, restore " \
           "journals a lost connection left there. Exit 1 when it is unreachable."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--replay", action="store_true",
                            help="replay now the restore journals found there (the probe task does it every few "
                                 "minutes): each puts its customer back as it was before that run")

    def handle(self, *args, **o):
        host = Host.objects.filter(name=o["name"]).first()
        if host is None:
            raise BadInput(f"no host named {o['name']!r}")
        host = host_probe(host)
        doc = host_describe(host)
        if not host.reachable:
            self.fail(host.last_error, {**doc, "error": host.last_error, "exit_code": 1})
        doc["journals"] = getattr(host, "journals_left", 0)
        replayed = host_journals_left(host) if o["replay"] and doc["journals"] and not host.is_local else None
        if replayed is not None:
            doc["replayed"] = replayed
        if self.json_output:
            self.emit(doc)
            return
        free = size(host.free_bytes) if host.free_bytes is not None else "unknown"
        self.stdout.write(f"{host.name}: reachable; {host.os or 'OS unknown'}; {free} free under {host.root()}")
        self.stdout.write("tools: " + host.tool_summary())
        if host.last_error:
            self.stdout.write(f"warning: {host.last_error}")
        if doc["journals"]:
            count = "an unknown number of" if doc["journals"] < 0 else str(doc["journals"])  # sudo: root's folder
            self.stdout.write(f"journals: {count} restore journal(s) left there by runs that lost this host"
                              + ("" if replayed is not None else " (replayed at its next probe; --replay: now)"))
        for line in replayed or []:
            self.stdout.write(f"replay: {line}")
