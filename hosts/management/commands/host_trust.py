from core.cli import BadInput, KasaCommand
from hosts.models import Host
from hosts.services import HostInputError, host_describe, host_trust


class Command(KasaCommand):
    help = "Pin the host key with this fingerprint, if the host offers it now, and enable the host."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--fingerprint", required=True, metavar="SHA256:…",
                            help="the fingerprint host_add printed, checked on the host itself")

    def handle(self, *args, **o):
        host = Host.objects.filter(name=o["name"]).first()
        if host is None:
            raise BadInput(f"no host named {o['name']!r}")
        try:
            key = host_trust(host, o["fingerprint"])
        except HostInputError as exc:
            raise BadInput(str(exc)) from None
        if self.json_output:
            self.emit(host_describe(host))
        else:
            self.stdout.write(f"host {host.name}: host key {key.fingerprint} ({key.type}) pinned; host enabled")
