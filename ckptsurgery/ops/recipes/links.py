"""Which files of a model folder a merge may copy into its output folder (or read a chat template
from): a link is followed only where it stays within the folder, or, for a snapshot of the
Hugging Face cache (`…/models--org--name/snapshots/REV/`), within that repository's `blobs/`,
where the cache's own links point. A link elsewhere could be anyone's file (`/proc/self/environ`,
`~/.ssh/id_rsa`), and the merged folder is made to be published."""

from __future__ import annotations

import os


def folder_file(folder: str, name: str, notes: list[str]) -> str | None:
    """`folder/name` when it is a file that lies in the folder (or the cache's blobs, as above);
    None when there is none, or when it links out of the folder — said in `notes`."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    root = os.path.realpath(folder)
    places = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":  # the hub cache: snapshots/REV/NAME -> ../../blobs/HASH
        places.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    target = os.path.realpath(path)
    if any(os.path.commonpath([target, place]) == place for place in places):
        return path
    notes.append(f"{path}: not copied, it links out of its folder (to {target}); copy it yourself if you trust it")
    return None
