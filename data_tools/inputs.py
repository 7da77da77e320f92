"""Reading the converters' inputs, streaming and resumable: JSON Lines, parquet, image bytes.

Readers yield `(position, where, value)`: `position` is a JSON-able list saying where the input
stands *after* this item (a converter's journal stores it; handing it back resumes right after the
item), `where` names the file and line/row for messages. Memory stays bounded by one line (JSON
Lines) or one record batch (parquet), whatever the input size.

Damage that ends a file (a truncated gzip, an unreadable parquet page) cannot be skipped: it raises
DataToolError naming the file and line/row. A malformed *item* is handed to the caller to skip and
count (`BadLine` for a line that is not JSON).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import json
import os
import re
import zipfile
import zlib
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import DataToolError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
PARQUET_BATCH_ROWS = 64  # rows decoded at a time; a row may carry a document's inline images


def require_file(path: str, what: str) -> None:
    if not path:
        raise DataToolError(f"{what}: no file given")
    if not os.path.exists(path):
        raise DataToolError(f"{path}: no such file ({what})")
    if not os.path.isfile(path):
        raise DataToolError(f"{path}: not a regular file ({what})")


def load_json(path: str, what: str):
    """A whole JSON file (only for inputs that are one JSON object: MIMIC-IT's)."""
    require_file(path, what)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataToolError(f"{path}: not valid JSON ({what}): {e}") from e


def file_stamp(path: str) -> Dict:
    """What identifies an input between runs: a changed stamp means a conversion starts over."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ----------------------------------------------------------------------------------------------
# JSON Lines (plain, gzip, or inside a zip)


class BadLine:
    """A line that is not JSON; the converter skips it as `bad_json`."""

    def __init__(self, error: str):
        self.error = error


def jsonl_streams(paths: Sequence[str], what: str) -> List[Tuple[str, str, Optional[str]]]:
    """(name for messages, file path, zip member or None) for each JSON Lines stream of the inputs:
    a .jsonl[.gz] file, or each .jsonl[.gz] member of a .zip (MMC4 ships zipped jsonl)."""
    streams = []
    for path in paths:
        require_file(path, what)
        if not path.endswith(".zip"):
            streams.append((path, path, None))
            continue
        try:
            with zipfile.ZipFile(path) as z:
                members = [i.filename for i in z.infolist() if not i.is_dir() and i.filename.endswith(JSONL_SUFFIXES)]
        except zipfile.BadZipFile as e:
            raise DataToolError(f"{path}: not a readable zip ({what}): {e}") from e
        if not members:
            raise DataToolError(f"{path}: holds no {'/'.join(JSONL_SUFFIXES)} member ({what})")
        streams.extend((f"{path}:{m}", path, m) for m in members)
    return streams


@contextlib.contextmanager
def _open_stream(path: str, member: Optional[str]) -> Iterator[BinaryIO]:
    with contextlib.ExitStack() as stack:
        if member is None:
            f = stack.enter_context(open(path, "rb"))
        else:
            f = stack.enter_context(stack.enter_context(zipfile.ZipFile(path)).open(member))
        if (member or path).endswith(".gz"):
            f = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
        yield f


def iter_jsonl(paths: Sequence[str], start: Optional[List[int]], what: str) -> Iterator[Tuple[List[int], str, Any]]:
    """(position, "file:line", parsed value or BadLine) for each non-blank line, from `start`.

    Position is [stream index, lines read, bytes read (uncompressed)]: a resumed read seeks to the
    byte offset (gzip and zip members seek by decompressing forward, still in bounded memory).
    """
    streams = jsonl_streams(paths, what)
    first, line_no, offset = start or (0, 0, 0)
    for index in range(first, len(streams)):
        name, path, member = streams[index]
        if index != first:
            line_no = offset = 0
        try:
            with _open_stream(path, member) as f:
                f.seek(offset)
                for raw in f:
                    line_no += 1
                    offset += len(raw)
                    if not raw.strip():
                        continue
                    try:
                        value = json.loads(raw)
                    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                        value = BadLine(str(e))
                    yield [index, line_no, offset], f"{name}:{line_no}", value
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise DataToolError(f"{name}: cannot read beyond line {line_no}: the file is damaged or truncated "
                                f"({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Parquet


def open_parquet(path: str, what: str):
    import pyarrow.parquet as pq

    require_file(path, what)
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataToolError(f"{path}: not a readable parquet file ({what}): {e}") from e


def iter_parquet_rows(paths: Sequence[str], start: Optional[List[int]], what: str, columns: Sequence[str]
                      ) -> Iterator[Tuple[List[int], str, Dict]]:
    """(position [file index, rows read], "file: row N", row as a dict) from `start`, reading
    `PARQUET_BATCH_ROWS` rows at a time (pyarrow buffers at most a row group). A resumed read
    starts at the row group holding the next row; earlier row groups are never read."""
    import pyarrow as pa

    first, skip_rows = start or (0, 0)
    for index in range(first, len(paths)):
        path = paths[index]
        pf = open_parquet(path, what)
        row = skip_rows if index == first else 0
        groups, group_start = [], 0
        for g in range(pf.num_row_groups):
            num_rows = pf.metadata.row_group(g).num_rows
            if group_start + num_rows > row:
                groups.append(g)
            else:
                group_start += num_rows
        present = [c for c in columns if c in pf.schema_arrow.names]
        if not groups:
            continue
        at = group_start
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=present):
                for values in batch.to_pylist():
                    at += 1
                    if at > row:
                        yield [index, at], f"{path}: row {at - 1}", values
        except (OSError, pa.ArrowException) as e:
            raise DataToolError(f"{path}: cannot read beyond row {at}: the file is damaged ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Image bytes


_DATA_URI = re.compile(r"^data:[\w/+.-]+;base64,")


def decode_base64(value: Union[str, bytes]) -> bytes:
    """Strict base64 decode (whitespace and a `data:...;base64,` prefix tolerated); ValueError if bad."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="strict")
    if not isinstance(value, str):
        raise ValueError(f"expected a base64 string, got {type(value).__name__}")
    value = _DATA_URI.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(str(e)) from e


def sniff_image_ext(data: bytes) -> Optional[str]:
    """File extension from the magic bytes, or None when not a known image format."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def read_image_file(path: str) -> Optional[bytes]:
    """The file's bytes, or None when it does not exist (the caller counts it as missing)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
