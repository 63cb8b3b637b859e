import sys

from core.cli import EXIT_BAD_INPUT, BadInput, KasaCommand
from hosts.services import HostInputError, host_add, host_describe, parse_ssh_spec


class Command(KasaCommand):
    help = ("Register a remote host reached over SSH. Its host key is scanned and shown; it is pinned only with "
            "--trust-host-key (else the host stays disabled and the exit code is 2).")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--ssh", required=True, metavar="USER@ADDRESS[:PORT]")
        key = parser.add_mutually_exclusive_group(required=True)
        key.add_argument("--key-file", default="", metavar="PATH",
                         help="a private key file on every worker (it stays there; Kasa stores its path)")
        key.add_argument("--key-stdin", action="store_true",
                         help="read the private key from stdin (stored encrypted; never on the command line)")
        parser.add_argument("--trust-host-key", action="store_true",
                            help="pin the host key scanned now (check its fingerprint first)")
        parser.add_argument("--sudo", action="store_true",
                            help="the SSH user is not root: run Kasa's commands through `sudo -n` (the host needs "
                                 "the rule of deploy/sudoers/kasa)")
        parser.add_argument("--db-tools", choices=["kasa", "host"], default="kasa",
                            help="which pg_dump backs up the host's PostgreSQL databases: Kasa's own on the worker "
                                 "through a forward (default), or the host's own, run there (only when its server is "
                                 "newer than Kasa's pg_dump, say; KASA_REMOTE_PG_BIN names its folder)")
        parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
        parser.add_argument("--customers-root", default="/srv/kasa/customers", metavar="PATH",
                            help="the folder holding the customers' roots on the host")

    def handle(self, *args, **o):
        labels = {}
        for spec in o["label"]:
            k, sep, v = spec.partition("=")
            if not sep or not k.strip():
                raise BadInput(f"--label {spec!r}: use KEY=VALUE")
            labels[k.strip()] = v.strip()
        private_key = sys.stdin.read() if o["key_stdin"] else ""
        if o["key_stdin"] and "PRIVATE KEY" not in private_key:
            raise BadInput("--key-stdin: stdin holds no private key")
        try:
            user, address, port = parse_ssh_spec(o["ssh"])
            added = host_add(name=o["name"], user=user, address=address, port=port, private_key=private_key,
                             key_file=o["key_file"], labels=labels, customers_root=o["customers_root"],
                             trust_host_key=o["trust_host_key"], sudo=o["sudo"], db_client_tools=o["db_tools"])
        except HostInputError as exc:
            raise BadInput(str(exc)) from None
        host = added.host
        doc = {**host_describe(host), "scanned": [{"type": k.type, "fingerprint": k.fingerprint}
                                                  for k in added.scanned],
               "scan_error": added.scan_error or None}
        if added.trusted:
            if self.json_output:
                self.emit(doc)
            else:
                self.stdout.write(f"added host {host.name} ({host.ssh_spec()}); host key {host.fingerprint()} "
                                  "pinned")
            return
        if added.scanned:
            how = (f"check the fingerprint out of band (on the host: ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), "
                   f"then run: manage.py host_trust {host.name} --fingerprint {added.scanned[0].fingerprint}")
        else:
            how = f"no host key could be scanned ({added.scan_error}); fix the address and add it again"
        message = f"host {host.name} stored disabled, its host key NOT trusted: {how}"
        if self.json_output:
            self.emit({**doc, "error": message, "exit_code": EXIT_BAD_INPUT})
        else:
            self.stdout.write(f"host {host.name} ({host.ssh_spec()}) offers these host keys:")
            for k in added.scanned:
                self.stdout.write(f"  {k.type:<22} {k.fingerprint}")
        exc = BadInput(message)
        exc._kasa_printed = True
        raise exc
