#!/usr/bin/env python3
"""Build the example's zips: one per component and version named in releases.json, from src/<component>/.

    python3 docs/releases-example/build.py [OUT]      (OUT: where the zips go; default: next to releases.json)

Each zip holds one top-level folder named after the component (Kasa records it as the zip's root), a VERSION
file, and regular files only. Timestamps are fixed so that a rebuild of unchanged sources gives the same bytes
with the same zlib, hence the same sha256: a version already registered is never "changed" by a rebuild.
"""

import json
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXED_TIME = (2025, 1, 1, 0, 0, 0)


def build_zip(component: str, version: str, dest: Path) -> None:
    src = HERE / "src" / component
    members = {f"{component}/{p.relative_to(src).as_posix()}": p.read_bytes()
               for p in sorted(src.rglob("*")) if p.is_file()}
    members[f"{component}/VERSION"] = f"{version}\n".encode()
    with zipfile.ZipFile(dest, "w") as zf:
        for name, data in sorted(members.items()):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.create_system = 3  # Unix: the mode below is read back as a regular file, 0644
            info.external_attr = 0o100644 << 16
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)


def main(out: Path) -> None:
    data = json.loads((HERE / "releases.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for component, versions in data.items():
        if component == "compatMatrix":
            continue
        for entry in versions:
            build_zip(component, entry["version"], out / entry["file"])
            print(out / entry["file"])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
