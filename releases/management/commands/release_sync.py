from core.cli import BadInput, KasaCommand
from releases.services import ReleaseInputError, ReleaseStorageError, release_sync


class Command(KasaCommand):
    help = ("Import releases.json and the zips it names (paths relative to it) into the release registry. "
            "All or nothing: invalid input exits 2 and imports nothing; re-running it is harmless.")

    def add_arguments(self, parser):
        parser.add_argument("path", help="releases.json, or the folder holding it")

    def handle(self, *args, **o):
        try:
            result = release_sync(o["path"], via="cli")
        except ReleaseInputError as exc:
            raise BadInput(str(exc)) from None
        except ReleaseStorageError as exc:
            self.fail(str(exc), {"error": str(exc), "exit_code": 1})
        if self.json_output:
            self.emit(result.as_dict())
            return
        self.stdout.write(
            f"{result.source}: {len(result.versions_created)} new version(s), "
            f"{len(result.versions_existing)} already registered; {len(result.releases_created)} new release(s), "
            f"{len(result.releases_existing)} already registered"
            + (f"; notes updated for {', '.join(result.notes_updated)}" if result.notes_updated else ""))
        for label in result.versions_created:
            self.stdout.write(f"  + {label}")
        for name in result.releases_created:
            self.stdout.write(f"  + release {name}")
