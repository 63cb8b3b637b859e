"""The check of an extracted tree against the checked tar listing (engines.unpack's last step).

A module of its own, standard library only, so that a customer's host runs exactly this check through
engines.hostcall after a remote restore's tar (engines.hostrestore): no cryptography or Kasa's storage code there.
"""

from __future__ import annotations

import os
import stat

from . import tarcheck as tc
from .tarcheck import ArchiveRefused, ArtifactError, Listing, show

__all__ = ["check_tree"]


# --- after tar -----------------------------------------------------------------------------
def check_tree(dest, listing: Listing, *, artifact: str = "", uid: int | None = None) -> None:
    """Walk the extracted tree without following links. Refuse devices, FIFOs, sockets, a setuid/setgid bit,
    an entry not owned by `uid` (when given), a symlink that resolves outside dest, a file hard-linked to
    something outside dest; then require the tree to be exactly what the scanner listed (every path and its
    type when listing.paths is kept, else the counts and total size). Raises ArchiveRefused / ArtifactError."""
    root = os.fsencode(os.path.abspath(os.fspath(dest)))
    real_root = os.path.realpath(root)
    label = f"{artifact}: " if artifact else ""
    expected = listing.paths
    counts = {tc.DIR: 0, tc.FILE: 0, tc.SYMLINK: 0}
    inodes: dict[tuple[int, int], list[int]] = {}
    sizes: dict[tuple[int, int], int] = {}
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
            for entry in it:
                rel = rel_dir + b"/" + entry.name if rel_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                mode = st.st_mode
                if mode & tc.SETID and not stat.S_ISLNK(mode):
                    raise ArchiveRefused(f"{label}the extracted {show(rel)} has a setuid or setgid bit (mode "
                                         f"{stat.S_IMODE(mode):o}) although its header had none: the two readings "
                                         "of the archive differ", member=show(rel)[1:-1], rule="set-id bit")
                if uid is not None and st.st_uid != uid:
                    raise ArchiveRefused(f"{label}the extracted {show(rel)} belongs to uid {st.st_uid}, not {uid}: "
                                         "the archive's owners are never used", member=show(rel)[1:-1],
                                         rule="owner")
                if stat.S_ISDIR(mode):
                    kind = tc.DIR
                    stack.append(rel)
                elif stat.S_ISREG(mode):
                    kind = tc.FILE
                    key = (st.st_dev, st.st_ino)
                    sizes[key] = st.st_size
                    if st.st_nlink > 1:
                        inodes.setdefault(key, [0, st.st_nlink])[0] += 1
                elif stat.S_ISLNK(mode):
                    kind = tc.SYMLINK
                    if st.st_nlink > 1:  # a hard-linked symlink: every name of it must be inside too
                        inodes.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink])[0] += 1
                    target = os.path.realpath(entry.path)
                    if target != real_root and not target.startswith(real_root + b"/"):
                        raise ArchiveRefused(f"{label}the extracted symbolic link {show(rel)} resolves outside "
                                             f"{os.fsdecode(root)}", member=show(rel)[1:-1],
                                             rule="symlink outside")
                else:
                    raise ArchiveRefused(f"{label}the extracted {show(rel)} is a device, FIFO or socket",
                                         member=show(rel)[1:-1], rule="special file")
                counts[kind] += 1
                if expected is not None:
                    want = expected.get(rel)
                    if want != kind and not (kind == tc.FILE and want == tc.HARDLINK):
                        what = f"lists it as a {tc.KIND_NAMES[want]}" if want else "does not have it"
                        raise ArtifactError(f"{label}tar extracted {show(rel)} as a {tc.KIND_NAMES[kind]} but the "
                                            f"checked listing {what}: the two readings of the archive differ")
    for (_dev, ino), (seen, nlink) in inodes.items():
        if seen != nlink:
            raise ArchiveRefused(f"{label}an extracted file or link (inode {ino}) has {nlink} hard links but only "
                                 f"{seen} inside the extraction folder: it is linked to a file outside",
                                 rule="hard link outside")
    total = sum(sizes.values())
    want = (listing.dirs, listing.files + listing.hardlinks, listing.symlinks, listing.total_size)
    got = (counts[tc.DIR], counts[tc.FILE], counts[tc.SYMLINK], total)
    if want != got:
        raise ArtifactError(f"{label}the extracted tree does not match the checked listing (directories, files, "
                            f"symlinks, bytes: {got} on disk, {want} listed): the two readings of the archive differ")
