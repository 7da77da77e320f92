"""`mmtrain-data inspect`: what a dataset directory holds, and its first samples as the model will
see them (text with the images in place), as text, an HTML page and/or a PNG contact sheet.

Every sample becomes a `View`: a header and a flat list of segments in reading order,
("text", str), ("image", name, bytes or None) or ("break",); the three renderers only lay segments
out, so all kinds (mimicit, interleaved, pairs) render the same way.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from mmtrain.data.formats import PAIR_IMAGE_EXTENSIONS, VALIDATORS, FormatError, read_manifest, sha256_file

from .tars import iter_tar_groups

HTML_THUMB_PX = 384
PNG_WIDTH_PX, PNG_THUMB_PX, PNG_MARGIN_PX, PNG_FONT_PX = 960, 96, 8, 14
PNG_MAX_CHARS = 2000  # per sample: a contact sheet is for looking, not reading whole documents
MAX_FRAMES_SHOWN = 8
TEXT_WIDTH = 100


@dataclass
class View:
    where: str  # shard:key
    header: str
    segments: List[Tuple] = field(default_factory=list)


def image_desc(name: str, data: Optional[bytes]) -> str:
    if data is None:
        return f"<image {name}: MISSING>"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return f"<image {name} {im.format} {im.width}x{im.height}>"
    except Exception as e:  # a broken image is something to show, not a crash
        return f"<image {name}: undecodable ({type(e).__name__})>"


def _episode_segments(record: Dict, members: Dict[str, bytes]) -> List[Tuple]:
    segments = []
    for i, turn in enumerate(record["turns"]):
        role = "target" if i == len(record["turns"]) - 1 else "context"
        segments.append(("text", f"[{i} {role}]"))
        segments += [("image", n, members.get(n)) for n in turn.get("images", [])]
        frames = turn.get("frames", [])
        if frames:
            segments.append(("text", f"frames ({len(frames)}):"))
            segments += [("image", n, members.get(n)) for n in frames[:MAX_FRAMES_SHOWN]]
            if len(frames) > MAX_FRAMES_SHOWN:
                segments.append(("text", f"... +{len(frames) - MAX_FRAMES_SHOWN} frames"))
        segments += [("text", f"User: {turn['instruction']} GPT: {turn['answer']}"), ("break",)]
    return segments


def view_sample(kind: str, where: str, members: Dict[str, bytes]) -> View:
    if kind == "pairs":
        ext = next((e for e in PAIR_IMAGE_EXTENSIONS if e in members), None)
        caption = members["txt"].decode("utf-8", "replace") if "txt" in members else "<no caption>"
        image = [("image", ext, members[ext])] if ext else [("text", "<no image>")]
        return View(where, "pair", image + [("text", caption)])
    try:
        record = json.loads(members.get("json", b"null"))
        VALIDATORS[kind](record, where)
    except (ValueError, FormatError) as e:
        return View(where, f"invalid record ({e})")
    header = f"id={record.get('id')} source={record.get('source')}"
    if kind == "mimicit":
        return View(where, f"{header} turns={len(record['turns'])}", _episode_segments(record, members))
    segments = [("text", p["text"]) if "text" in p else ("image", p["image"], members.get(p["image"]))
                for p in record["parts"]]
    num_images = sum(s[0] == "image" for s in segments)
    return View(where, f"{header} parts={len(segments)} images={num_images} url={record.get('meta', {}).get('url')}",
                segments)


# ----------------------------------------------------------------------------------------------
# Renderers


def render_text(view: View, width: int = TEXT_WIDTH) -> str:
    """Wrapped to `width`; an image placeholder is never split, and line breaks in texts are kept."""
    lines, line = [f"--- {view.where}  {view.header}"], "  "
    for seg in view.segments + [("break",)]:
        if seg[0] == "image":
            tokens = [image_desc(seg[1], seg[2])]
        elif seg[0] == "text":
            tokens = [t for i, para in enumerate(seg[1].split("\n")) for t in ([None] if i else []) + para.split()]
        else:
            tokens = [None]  # a line break
        for token in tokens:
            if token is None or (len(line) + len(token) > width and line.strip()):
                if line.strip():
                    lines.append(line.rstrip())
                line = "  "
            if token is not None:
                line += token + " "
    return "\n".join(lines)


def _thumbnail(data: Optional[bytes], max_px: Tuple[int, int]):
    """A PIL RGB thumbnail, or None when the bytes are missing or not an image."""
    if data is None:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail(max_px)
            return im
    except Exception:
        return None


def render_html(views: List[View], title: str, summary: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
           "body{font-family:sans-serif;max-width:70em;margin:1em auto}"
           ".sample{border-top:1px solid #ccc;padding:.6em 0}.where{color:#777;font-size:small}"
           ".text{white-space:pre-wrap}img{max-height:192px;vertical-align:middle;margin:2px;border:1px solid #ddd}"
           ".missing{color:#b00}</style></head><body>",
           f"<h1>{html.escape(title)}</h1><pre>{html.escape(summary)}</pre>"]
    for view in views:
        out.append(f"<div class='sample'><div class='where'>{html.escape(view.where)} &mdash; "
                   f"{html.escape(view.header)}</div><div>")
        for seg in view.segments:
            if seg[0] == "break":
                out.append("<br>")
            elif seg[0] == "text":
                out.append(f"<span class='text'>{html.escape(seg[1])}</span> ")
            else:
                thumb, desc = _thumbnail(seg[2], (HTML_THUMB_PX, HTML_THUMB_PX)), image_desc(seg[1], seg[2])
                if thumb is None:
                    out.append(f"<span class='missing'>{html.escape(desc)}</span> ")
                    continue
                buf = io.BytesIO()
                thumb.save(buf, format="JPEG", quality=85)
                out.append(f"<img src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}' "
                           f"title='{html.escape(desc)}' alt='{html.escape(desc)}'> ")
        out.append("</div></div>")
    out.append("</body></html>")
    return "\n".join(out)


def render_png(views: List[View], path: str) -> None:
    """A contact sheet: one block per sample, its text wrapped and its thumbnails in place."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=PNG_FONT_PX)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_px = PNG_FONT_PX + 6
    right = PNG_WIDTH_PX - PNG_MARGIN_PX
    ops = []  # (x, y, "text" | "grey" | "image" | "rule", payload), laid out first to size the canvas
    y = PNG_MARGIN_PX
    for view in views:
        ops.append((PNG_MARGIN_PX, y, "grey", f"{view.where}  {view.header}"[:160]))
        x, y, row_px, chars = PNG_MARGIN_PX, y + line_px, line_px, 0
        for seg in view.segments:
            items = []  # ("word", str) | ("image", thumbnail or description) | ("newline",)
            if seg[0] == "break":
                items = [("newline",)]
            elif seg[0] == "image":
                thumb = _thumbnail(seg[2], (2 * PNG_THUMB_PX, PNG_THUMB_PX))
                items = [("image", thumb)] if thumb is not None else [("word", image_desc(seg[1], seg[2]))]
            elif chars < PNG_MAX_CHARS:
                text = seg[1][: PNG_MAX_CHARS - chars] + ("..." if chars + len(seg[1]) > PNG_MAX_CHARS else "")
                chars += len(seg[1])
                for i, line in enumerate(text.split("\n")):
                    items += ([("newline",)] if i else []) + [("word", w) for w in line.split()]
            for item in items:
                if item[0] == "newline":
                    x, y, row_px = PNG_MARGIN_PX, y + row_px, line_px
                    continue
                width = item[1].width + 4 if item[0] == "image" else measure.textlength(item[1] + " ", font=font)
                if x + width > right and x > PNG_MARGIN_PX:
                    x, y, row_px = PNG_MARGIN_PX, y + row_px, line_px
                ops.append((x, y, "image" if item[0] == "image" else "text", item[1]))
                x += width
                row_px = max(row_px, item[1].height + 4 if item[0] == "image" else line_px)
        y += (row_px if x > PNG_MARGIN_PX else 0) + PNG_MARGIN_PX  # the last row, unless empty
        ops.append((0, y - PNG_MARGIN_PX // 2, "rule", None))
    canvas = Image.new("RGB", (PNG_WIDTH_PX, y + PNG_MARGIN_PX), "white")
    draw = ImageDraw.Draw(canvas)
    for x, top, what, payload in ops:
        if what == "image":
            canvas.paste(payload, (int(x), top))
        elif what == "rule":
            draw.line([(0, top), (PNG_WIDTH_PX, top)], fill=(200, 200, 200))
        else:
            draw.text((x, top), payload, fill=(120, 120, 120) if what == "grey" else (0, 0, 0), font=font)
    canvas.save(path, format="PNG")


# ----------------------------------------------------------------------------------------------
# The verb


def _describe_manifest(data_dir: str, manifest: Dict, verify: bool) -> Tuple[List[str], int]:
    shards = manifest["shards"]
    corpus = f", corpus {manifest['corpus']}" if "corpus" in manifest else ""
    lines = [f"{data_dir}: {manifest['format']}, kind {manifest['kind']}{corpus}, {len(shards)} shards, "
             f"{manifest.get('num_samples', sum(s['num_samples'] for s in shards))} samples"]
    bad = 0
    for i, shard in enumerate(shards):
        if not verify and i == 10:
            lines.append(f"  ... {len(shards) - 10} more shards")
            break
        line = f"  {shard['name']}  {shard['num_samples']} samples  sha256 {shard['sha256'][:12]}"
        if verify:
            ok = sha256_file(os.path.join(data_dir, shard["name"])) == shard["sha256"]
            bad += not ok
            line += "  OK" if ok else "  CHECKSUM MISMATCH"
        lines.append(line)
    stats = manifest.get("stats", {})
    if stats:
        lines.append(f"  conversion read {stats.get('num_read')}, wrote {stats.get('num_written')}")
    for title, name in (("skipped at conversion", "skipped"), ("images dropped at conversion", "dropped_images")):
        if stats.get(name):
            lines.append(f"  {title}: " + ", ".join(f"{k}={v}" for k, v in stats[name].items()))
    return lines, bad


def _source_of(kind: str, tar: tarfile.TarFile, infos: Dict[str, tarfile.TarInfo]) -> str:
    if kind == "pairs":
        return "pairs"
    try:
        return str(json.loads(tar.extractfile(infos["json"]).read()).get("source"))
    except (KeyError, ValueError, AttributeError):
        return "<unreadable record>"


def inspect(data_dir: str, num: int = 3, verify: bool = False, scan_shards: int = 1, html_path: Optional[str] = None,
            png_path: Optional[str] = None) -> Tuple[str, int]:
    """(the report as text, number of shards failing --verify)."""
    manifest = read_manifest(data_dir)
    kind = manifest["kind"]
    lines, bad = _describe_manifest(data_dir, manifest, verify)
    sources: Dict[str, int] = collections.Counter()
    views: List[View] = []
    shards = manifest["shards"]
    scan_shards = max(scan_shards, 1)
    for index, shard in enumerate(shards):
        if index >= scan_shards and len(views) >= num:
            break
        try:
            with tarfile.open(os.path.join(data_dir, shard["name"])) as tar:
                for key, infos in iter_tar_groups(tar):
                    if index >= scan_shards and len(views) >= num:
                        break
                    if index < scan_shards:
                        sources[_source_of(kind, tar, infos)] += 1
                    if len(views) < num:
                        members = {ext: tar.extractfile(info).read() for ext, info in infos.items()}
                        views.append(view_sample(kind, f"{shard['name']}:{key}", members))
        except (tarfile.TarError, OSError) as e:  # show what can be shown; --verify names the damage
            lines.append(f"  {shard['name']}: unreadable ({type(e).__name__}: {e})")
    scanned = min(scan_shards, len(shards))
    lines.append(f"  sources in the first {scanned} shard(s): " + ", ".join(f"{k}={v}" for k, v in sources.items()))
    summary = "\n".join(lines)
    if html_path:
        with open(html_path, "w", encoding="utf-8") as f:
            f.write(render_html(views, f"mmtrain-data inspect {data_dir}", summary))
    if png_path:
        render_png(views, png_path)
    return "\n".join([summary] + [render_text(v) for v in views]), bad
