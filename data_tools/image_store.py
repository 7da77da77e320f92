"""URL → image bytes from a local img2dataset download (the `--image-store` of `convert obelics`).

img2dataset writes each downloaded image as `KEY.jpg` (or png/webp) beside `KEY.json`, whose
"url" names the source URL: as files (`00000/000000012.jpg` + `.json`, output_format "files") or
as members of webdataset tars (`00000.tar`, output_format "webdataset"). Both are read as they
are, from anywhere under the store directory.

The store is indexed into an SQLite file (url → file, byte offset, size), so a lookup is one
indexed query and one read, and memory stays flat however many images the store holds. The index
remembers the store's fingerprint (every .tar/.json file's name, size and mtime): a resumed
conversion reuses it, a changed store rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tarfile
from typing import Iterator, List, Optional, Tuple

from mmtrain.data.formats import PAIR_IMAGE_EXTENSIONS

from . import DataToolError
from .inputs import read_image_file
from .tars import iter_tar_groups

_LOOSE = -1  # offset of an image stored as its own file


def _store_files(root: str) -> List[Tuple[str, int, int]]:
    """(path relative to root, size, mtime_ns) of every .tar and .json under root, sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            if name.endswith((".tar", ".json")):
                path = os.path.join(folder, name)
                st = os.stat(path)
                found.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return sorted(found)


def store_fingerprint(root: str) -> Tuple[List[Tuple[str, int, int]], str]:
    """The store's files and a digest of their names, sizes and mtimes (changes when images are added)."""
    files = _store_files(root)
    return files, hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _url_of(json_bytes: bytes) -> Optional[str]:
    try:
        url = json.loads(json_bytes).get("url")
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) and url else None


class ImageStore:
    def __init__(self, root: str, index_path: str, log=print):
        if not os.path.isdir(root):
            raise DataToolError(f"{root}: no such directory (--image-store)")
        self.root = root
        files, fingerprint = store_fingerprint(root)
        self.db = sqlite3.connect(index_path)
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (fingerprint TEXT)")
        if self.db.execute("SELECT fingerprint FROM meta").fetchone() != (fingerprint,):
            log(f"{root}: indexing the image store ({len(files)} .tar/.json files) into {index_path}")
            self._build(files, fingerprint)

    def _build(self, files: List[Tuple[str, int, int]], fingerprint: str) -> None:
        db = self.db
        db.executescript("DROP TABLE IF EXISTS images; DELETE FROM meta;"
                         "CREATE TABLE images (url TEXT PRIMARY KEY, path TEXT, offset INTEGER, size INTEGER);")
        for rel, _, _ in files:
            rows = self._tar_rows(rel) if rel.endswith(".tar") else self._loose_rows(rel)
            db.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", rows)  # first copy of a URL wins
        db.execute("INSERT INTO meta VALUES (?)", (fingerprint,))  # last: an interrupted build is redone
        db.commit()

    def _loose_rows(self, rel: str) -> Iterator[Tuple[str, str, int, int]]:
        stem = os.path.join(self.root, rel[: -len(".json")])
        with open(os.path.join(self.root, rel), "rb") as f:
            url = _url_of(f.read())
        for ext in PAIR_IMAGE_EXTENSIONS:
            if url and os.path.isfile(f"{stem}.{ext}"):
                yield url, f"{rel[: -len('.json')]}.{ext}", _LOOSE, os.path.getsize(f"{stem}.{ext}")
                return

    def _tar_rows(self, rel: str) -> Iterator[Tuple[str, str, int, int]]:
        try:
            with tarfile.open(os.path.join(self.root, rel), "r") as tar:
                for _, members in iter_tar_groups(tar):
                    image = next((members[e] for e in PAIR_IMAGE_EXTENSIONS if e in members), None)
                    url = _url_of(tar.extractfile(members["json"]).read()) if "json" in members else None
                    if image is not None and url:
                        yield url, rel, image.offset_data, image.size
        except (tarfile.TarError, OSError) as e:
            raise DataToolError(f"{os.path.join(self.root, rel)}: unreadable tar in the image store: {e}") from e

    def get(self, url: str) -> Optional[bytes]:
        row = self.db.execute("SELECT path, offset, size FROM images WHERE url = ?", (url,)).fetchone()
        if row is None:
            return None
        path, offset, size = row
        if offset == _LOOSE:
            return read_image_file(os.path.join(self.root, path))
        with open(os.path.join(self.root, path), "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return data if len(data) == size else None

    def close(self) -> None:
        self.db.close()
