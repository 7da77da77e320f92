"""OBELICS's published parquet → interleaved-document shards (kind "interleaved", corpus "obelics").

Input rows (HuggingFaceM4/OBELICS, `13_final_processing.py`), one document each:

    texts             [str | null, ...]   aligned with images: in each slot one of the two is set
    images            [url | null, ...]   released with URLs, not pixels; a {"bytes", "path"} struct
                                          (HF datasets' Image feature) or raw bytes are used as they are
    metadata          JSON string: a list aligned with the slots (image entries have "src", ...)
    general_metadata  JSON string with the page "url", ...
    image_bytes       optional list aligned with images (inline bytes), used when present

An image given as a URL is looked up in `image_store` (an img2dataset download; see
`data_tools.image_store`). An image that cannot be had is counted (`missing_image`; bytes that are
not an image: `bad_image`) and, per `on_missing_image`, left out of its document (`drop-image`,
the default) or the whole document is skipped (`drop-document`). A document left with no image is
skipped (`no_image`) unless `keep_text_only`. The paragraph marker
`END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED` is removed from texts; consecutive texts are joined by a
blank line into one text part, so text parts never touch. The record:

    {"id": "obelics-00000-12", "source": "obelics", "parts": [...],
     "meta": {"url": <general_metadata.url>, "image_urls": [url of each image member, in order]}}

with id = input file stem + row number. Rows are read a record batch at a time (bounded memory).
While converting, the store's URL index lives in `OUT/image_store_index.sqlite`; it is removed
when the conversion completes.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

from . import DataToolError
from .image_store import ImageStore, store_fingerprint
from .inputs import file_stamp, iter_parquet_rows, open_parquet, require_file, sniff_image_ext
from .interleaved import DocumentBuilder
from .sharding import ConvertResult, Record, run_conversion, skipped

END_OF_DOCUMENT = "END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED"
ON_MISSING_IMAGE = ("drop-image", "drop-document")
COLUMNS = ("texts", "images", "metadata", "general_metadata", "image_bytes")
IMAGE_INDEX_NAME = "image_store_index.sqlite"


def _image(slot, inline: Optional[bytes], store: Optional[ImageStore]) -> Tuple[Optional[bytes], Optional[str]]:
    """(bytes or None, the URL when there is one) for one images[] entry."""
    url = slot if isinstance(slot, str) else None
    if isinstance(slot, dict):
        inline = inline or slot.get("bytes")
        url = slot.get("url") or slot.get("path")
    elif isinstance(slot, bytes):
        inline = slot
    if inline:
        return bytes(inline), url
    return (store.get(url) if store is not None and url else None), url


def build_document(row: Dict, where: str, position, *, store: Optional[ImageStore], on_missing_image: str,
                   keep_text_only: bool, source: str) -> Record:
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        return skipped(position, "bad_record", f"{where}: texts and images must be lists of equal length")
    try:
        general = json.loads(row.get("general_metadata") or "{}")
    except ValueError as e:
        return skipped(position, "bad_record", f"{where}: general_metadata is not JSON ({e})")
    inline = row.get("image_bytes") or [None] * len(images)

    doc_builder, urls, drops = DocumentBuilder(separator="\n\n"), [], []
    for i, (text, slot) in enumerate(zip(texts, images)):
        if slot is not None:
            data, url = _image(slot, inline[i] if i < len(inline) else None, store)
            ext = sniff_image_ext(data) if data else None
            if ext is None:
                drops.append(("missing_image" if data is None else "bad_image", f"{where}: image {i} ({url})"))
            else:
                doc_builder.image(data, ext)
                urls.append(url)
        if isinstance(text, str):
            doc_builder.text(text.replace(END_OF_DOCUMENT, ""))
    if drops and on_missing_image == "drop-document":
        return skipped(position, drops[0][0], drops[0][1], drops)
    url = general.get("url") if isinstance(general, dict) else None
    return doc_builder.record(position, f"{_stem(where)}-{position[1] - 1}", where, source=source,
                              meta={"url": url, "image_urls": urls}, keep_text_only=keep_text_only, dropped_images=drops)


def _stem(where: str) -> str:
    base = os.path.basename(where.rsplit(": row", 1)[0])
    return base[: -len(".parquet")] if base.endswith(".parquet") else base


def convert_obelics(
    inputs: Sequence[str],
    out_dir: str,
    *,
    image_store: Optional[str] = None,
    on_missing_image: str = "drop-image",
    keep_text_only: bool = False,
    source: str = "obelics",
    **run_options,
) -> ConvertResult:
    """Convert OBELICS parquet files into shards in `out_dir` (see the module docstring).
    `run_options`: shard_samples, shard_mib, force, quiet (see `sharding.run_conversion`)."""
    if on_missing_image not in ON_MISSING_IMAGE:
        raise DataToolError(f"--on-missing-image {on_missing_image!r}: expected one of {', '.join(ON_MISSING_IMAGE)}")
    if not inputs:
        raise DataToolError("convert obelics: no input file given")
    for path in inputs:
        require_file(path, "OBELICS parquet")
    if image_store is not None and not os.path.isdir(image_store):
        raise DataToolError(f"{image_store}: no such directory (--image-store)")

    def read(position) -> Tuple[int, Iterator[Record]]:
        files = [open_parquet(p, "OBELICS parquet") for p in inputs]
        for path, pf in zip(inputs, files):
            missing = {"texts", "images"} - set(pf.schema_arrow.names)
            if missing:
                raise DataToolError(f"{path}: no {', '.join(sorted(missing))} column "
                                    f"(columns: {', '.join(pf.schema_arrow.names)}); is this OBELICS?")
        store = ImageStore(image_store, os.path.join(out_dir, IMAGE_INDEX_NAME)) if image_store else None

        def records():
            try:
                for pos, where, row in iter_parquet_rows(inputs, position, "OBELICS parquet", COLUMNS):
                    yield build_document(row, where, pos, store=store, on_missing_image=on_missing_image,
                                         keep_text_only=keep_text_only, source=source)
            finally:
                if store is not None:
                    store.close()

        return sum(pf.metadata.num_rows for pf in files), records()

    # The store's fingerprint is an input too: images downloaded since the last run mean converting again.
    store_params = [os.path.abspath(image_store), store_fingerprint(image_store)[1]] if image_store else None
    params = {"inputs": [file_stamp(p) for p in inputs], "image_store": store_params,
              "on_missing_image": on_missing_image, "keep_text_only": keep_text_only, "source": source}
    result = run_conversion(out_dir, kind="interleaved", corpus="obelics", unit="documents", params=params, read=read,
                            **run_options)
    if os.path.exists(os.path.join(out_dir, IMAGE_INDEX_NAME)):  # only needed while converting
        os.remove(os.path.join(out_dir, IMAGE_INDEX_NAME))
    return result
