"""Building interleaved-document records (kind "interleaved"), shared by the MMC4 and OBELICS converters."""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

from mmtrain.data.formats import FormatError, validate_document

from .sharding import Record, sample_key, skipped


class DocumentBuilder:
    """A document's parts in reading order and its image members (`0.jpg`, `1.png`, ... in order).
    Consecutive texts are joined by `separator` into one part, so text parts never touch and a
    loader can render parts as they are."""

    def __init__(self, separator: str):
        self.separator = separator
        self.parts: List[Dict[str, str]] = []
        self.members: Dict[str, bytes] = {}
        self._texts: List[str] = []

    def _flush(self) -> None:
        if self._texts:
            self.parts.append({"text": self.separator.join(self._texts)})
            self._texts = []

    def text(self, text: str) -> None:
        if text.strip():
            self._texts.append(text.strip())

    def image(self, data: bytes, ext: str) -> None:
        self._flush()
        name = f"{len(self.members)}.{ext}"
        self.members[name] = data
        self.parts.append({"image": name})

    def record(self, position, doc_id: str, where: str, *, source: str, meta: Dict, keep_text_only: bool,
               dropped_images: Optional[List[Tuple[str, str]]] = None) -> Record:
        """The sample, or the document's skip: no image kept (unless keep_text_only), or nothing left."""
        self._flush()
        if not self.members and not keep_text_only:
            return skipped(position, "no_image", f"{where}: no image kept", dropped_images)
        record = {"id": doc_id, "source": source, "parts": self.parts, "meta": meta}
        try:
            validate_document(record, where)
        except FormatError as e:
            return skipped(position, "empty_document" if not self.parts else "bad_record", str(e), dropped_images)
        members = dict(self.members, json=json.dumps(record, ensure_ascii=False).encode("utf-8"))
        return Record(position, sample_key(doc_id), members, dropped_images=list(dropped_images or []))
