from core.cli import KasaCommand
from engines.humanize import human_size
from releases.selectors import registry_document


class Command(KasaCommand):
    help = "List releases (newest first) with their component versions, then every component version."

    def handle(self, *args, **o):
        doc = registry_document()
        if self.json_output:
            self.emit(doc)
            return
        if not doc["releases"] and not doc["component_versions"]:
            self.stdout.write("no releases registered (import some with release_sync PATH/releases.json)")
            return
        for r in doc["releases"]:
            versions = ", ".join(f"{c['component']} {c['version']}" for c in r["components"])
            self.stdout.write(f"{r['name']:<20} {versions}")
        self.stdout.write("")
        for cv in doc["component_versions"]:
            self.stdout.write(f"{cv['component']:<12} {cv['version']:<16} {human_size(cv['size']):>10}  "
                              f"{cv['sha256']}  {', '.join(cv['releases']) or '(in no release)'}")
