"""Reading webdataset tars: samples are runs of consecutive members sharing a key, the member path
up to the first '.' of its base name (webdataset's rule; `00000/000000012.jpg` → key
`00000/000000012`, extension `jpg`)."""

from __future__ import annotations

import tarfile
from typing import Dict, Iterator, Tuple


def split_member_name(name: str) -> Tuple[str, str]:
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def iter_tar_groups(tar: tarfile.TarFile) -> Iterator[Tuple[str, Dict[str, tarfile.TarInfo]]]:
    """(key, {extension: TarInfo}) per sample, in tar order; works on streamed tars ("r|") too."""
    key, members = None, {}
    for info in tar:
        if not info.isfile():
            continue
        k, ext = split_member_name(info.name)
        if k != key and members:
            yield key, members
            members = {}
        key = k
        members[ext] = info
    if members:
        yield key, members


def iter_tar_samples(path: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of one tar file."""
    with tarfile.open(path, "r") as tar:
        for key, infos in iter_tar_groups(tar):
            yield key, {ext: tar.extractfile(info).read() for ext, info in infos.items()}
