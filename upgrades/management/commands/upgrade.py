from core.cli import BadInput, KasaCommand
from customers.models import Customer
from engines.humanize import human_duration, human_time
from operations.cli import add_run_arguments, enqueued_or_run_here
from releases.models import Release
from upgrades.models import Upgrade
from upgrades.services import UpgradeInputError, upgrade_document, upgrade_start


class Command(KasaCommand):
    help = ("Upgrade a customer to a registered release: preflight, pinned backup, stage, merge .env, hooks, "
            "stop, switch, start, health check; any failure after the backup rolls everything back. "
            "A customer without recorded versions gets an install. Exit 0 only when the upgrade succeeded.")

    def add_arguments(self, parser):
        parser.add_argument("domain")
        parser.add_argument("--to", required=True, metavar="RELEASE", help="the release's name (release_list)")
        parser.add_argument("--dry-run", action="store_true", help="run the preflight only; nothing changes")
        parser.add_argument("--force", action="store_true",
                            help="allow a release that was rolled back for this customer before")
        parser.add_argument("--strategy", choices=Upgrade.Strategy.values, default=Upgrade.Strategy.IN_PLACE,
                            help="blue-green: start and check the new release beside the live one before the "
                                 "switch (default: in place)")
        add_run_arguments(parser)

    def handle(self, *args, **o):
        customer = Customer.objects.filter(domain=o["domain"].lower()).first()
        if customer is None:
            raise BadInput(f"no customer with domain {o['domain']!r}")
        release = Release.objects.filter(name=o["to"]).first()
        if release is None:
            names = ", ".join(Release.objects.values_list("name", flat=True)[:20]) or "none registered"
            raise BadInput(f"no release named {o['to']!r} (releases: {names})")
        try:
            run = upgrade_start(customer, release, force=o["force"], dry_run=o["dry_run"], via="cli",
                                enqueue=o["enqueue"], strategy=o["strategy"])
        except UpgradeInputError as exc:
            raise BadInput(str(exc)) from None
        run = enqueued_or_run_here(self, run, enqueue=o["enqueue"], wait=o["wait"], what="upgrade")
        if run is None:
            return
        up = Upgrade.objects.select_related("customer", "to_release").get(run=run)
        report(self, up, run)


def report(command: KasaCommand, up: Upgrade, run) -> None:
    """Print the upgrade (JSON: upgrade_document); exit 0 only for `succeeded`."""
    doc = upgrade_document(up)
    if up.status != Upgrade.Status.SUCCEEDED:
        command.fail(f"{up.get_kind_display().lower()} #{up.pk} of {up.customer} {up.status}: "
                     f"{up.error or run.error}", doc)
    if command.json_output:
        command.emit(doc)
    elif up.dry_run:
        command.stdout.write(f"preflight of {up.customer} → {up.to_release}: ok")
        for check in up.preflight.get("checks", []):
            command.stdout.write(f"  {'ok' if check['ok'] else 'warning'}  {check['name']}: {check['detail']}")
    else:
        to = ", ".join(f"{c} {v}" for c, v in sorted(up.to_versions.items()))
        command.stdout.write(f"{up.get_kind_display().lower()} #{up.pk} of {up.customer} succeeded: {to} "
                             f"(in {human_duration(run.duration)}, finished {human_time(run.finished_at)})")
