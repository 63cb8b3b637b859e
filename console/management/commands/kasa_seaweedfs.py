"""`make run S3=1` (scripts/run.sh): a local SeaweedFS holding an immutable copy of the demo's backups.

    manage.py kasa_seaweedfs prepare   folder, identities (0600, a secret generated once), free ports, and the
                                       server's argv in <folder>/weed.argv (NUL-separated) for run.sh to start
    manage.py kasa_seaweedfs demo      waits for the server, makes the Object Lock bucket and the storage target
                                       demo-s3, a replica of the demo customer's policy; prints where S3 runs

The folder is $KASA_VAR_DIR/seaweedfs (0700: the secret is in it). run.sh runs weed itself, as one of its jobs,
so Ctrl-C stops it with the web server and the worker. The secret is never printed.
"""

from django.conf import settings

from console.s3demo import BUCKET, LOCK_DAYS, LOCK_MODE, demo_s3_target
from core.cli import KasaCommand
from engines import seaweedfs


def folder():
    return settings.KASA_VAR_DIR / "seaweedfs"


class Command(KasaCommand):
    help = "make run S3=1: prepare a local SeaweedFS, then make its locked bucket the demo's replica target."

    def add_arguments(self, parser):
        parser.add_argument("step", choices=["prepare", "demo"])
        parser.add_argument("--pid", type=int, help="demo: weed's process id (stop waiting if it exits)")
        parser.add_argument("--timeout", type=float, default=60)

    def handle(self, *args, **o):
        where = folder()
        if o["step"] == "prepare":
            prepared = seaweedfs.prepare(where)
            with open(where / "weed.argv", "wb") as out:
                out.write(b"".join(a.encode() + b"\0" for a in prepared.argv))
            if self.json_output:
                self.emit({"folder": str(where), "endpoint": prepared.endpoint})
            else:
                self.stdout.write(str(where))
            return
        prepared = seaweedfs.prepare_state(where)
        secret = seaweedfs.read_secret(where)
        pid = o["pid"]
        seaweedfs.wait_ready(prepared["endpoint"], prepared["access_key"], secret, timeout=o["timeout"],
                             alive=(lambda: _alive(pid)) if pid else (lambda: True))
        made = seaweedfs.ensure_locked_bucket(
            seaweedfs.client(prepared["endpoint"], prepared["access_key"], secret), BUCKET)
        target, customer = demo_s3_target(endpoint=prepared["endpoint"], access_key=prepared["access_key"],
                                          secret_key=secret)
        doc = {"endpoint": prepared["endpoint"], "bucket": BUCKET, "bucket_created": made, "folder": str(where),
               "target": target.name, "lock": f"{LOCK_MODE}, {LOCK_DAYS} day(s)",
               "replica_of": customer.domain if customer else None}
        if self.json_output:
            self.emit(doc)
            return
        of = (f"a locked replica of {customer.domain}'s backups" if customer
              else "add it to a policy's replicas to use it")
        self.stdout.write(f"S3 (SeaweedFS) at {doc['endpoint']}, bucket {BUCKET} ({LOCK_MODE} lock, {LOCK_DAYS} day), "
                          f"data in {where}: storage target {target.name}, {of}")


def _alive(pid: int) -> bool:
    """Running, not a zombie: weed is run.sh's child, not reaped until run.sh waits for it."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
