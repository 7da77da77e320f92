"""What every converter shares: shards with a progress journal (resume), progress bar, counts by
reason, and the summary.

A converter is a reader: given a resume position (None: the start) it yields `Record`s in a fixed
order, each carrying the input position right after it. `run_conversion` writes the records into
shards (`ShardWriter`, which closes a shard right after the record that fills it) and, each time a
shard is complete, appends a line to `convert_journal.jsonl` in the output directory:

    {"params": {...}}            corpus, kind, options and input stamps (path, size, mtime)
    {"shard": "shard-000000.tar", "num_samples": .., "sha256": .., "size": .., "mtime_ns": ..,
     "position": [...], "stats": {...}}          one per complete shard, in order
    {"complete": true, "position": [...], "stats": {...}}     after manifest.json is written

On start, with the same params: a complete journal whose shards are untouched means there is
nothing to do (no file is written); an incomplete one keeps the longest run of intact journaled
shards (size and mtime as written, else the sha256 must match), deletes every other shard file,
and restarts the reader at the last kept position with the counts as they were there. Because the
records come in a fixed order and shards close at fixed records, the resumed output is
byte-identical to an uninterrupted one. Other params (changed inputs or options) or `force` start
over. `manifest.json` exists only while the output is complete.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from mmtrain.data.formats import MANIFEST_NAME, ShardInfo, ShardWriter, sha256_file, write_manifest

from . import DataToolError

JOURNAL_NAME = "convert_journal.jsonl"
JOURNAL_VERSION = 1
_OUR_SHARD = re.compile(r"shard-\d{6}\.tar(\.tmp)?")


@dataclass
class Record:
    """One input record: a sample to write (`members`), or a skip with its reason."""

    position: Any  # the input position right after this record (JSON-able), to resume from
    key: str = ""
    members: Optional[Dict[str, bytes]] = None  # extension -> bytes; None when skipped
    skip: str = ""  # why the record is not written
    detail: str = ""  # where and what, e.g. "docs.jsonl:12: no image kept"
    dropped_images: List[Tuple[str, str]] = field(default_factory=list)  # (reason, detail) per image left out


def skipped(position: Any, reason: str, detail: str, dropped_images: Optional[List[Tuple[str, str]]] = None) -> Record:
    return Record(position, skip=reason, detail=detail, dropped_images=list(dropped_images or []))


@dataclass
class Stats:
    """Counts kept in the journal and the manifest. `skipped`: records not written, by reason;
    `dropped_images`: images left out, by reason; `examples`: the first occurrence of each reason."""

    num_read: int = 0
    num_written: int = 0
    skipped: Dict[str, int] = field(default_factory=collections.Counter)
    dropped_images: Dict[str, int] = field(default_factory=collections.Counter)
    examples: Dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, detail)

    def count(self, record: Record) -> None:
        self.num_read += 1
        if record.members is None:
            self.skip(record.skip, record.detail)
        else:
            self.num_written += 1
        for reason, detail in record.dropped_images:
            self.dropped_images[reason] += 1
            self.examples.setdefault(reason, detail)

    def merge(self, other: "Stats") -> None:
        self.num_read += other.num_read
        self.num_written += other.num_written
        self.skipped.update(other.skipped)
        self.dropped_images.update(other.dropped_images)
        for reason, detail in other.examples.items():
            self.examples.setdefault(reason, detail)

    def to_json(self) -> Dict:
        return {"num_read": self.num_read, "num_written": self.num_written,
                "skipped": dict(sorted(self.skipped.items())), "dropped_images": dict(sorted(self.dropped_images.items())),
                "examples": dict(sorted(self.examples.items()))}

    @classmethod
    def from_json(cls, body: Dict) -> "Stats":
        return cls(body["num_read"], body["num_written"], collections.Counter(body["skipped"]),
                   collections.Counter(body["dropped_images"]), dict(body["examples"]))

    def describe(self, unit: str) -> str:
        lines = []
        for title, counts in ((f"{unit} skipped", self.skipped), ("images dropped", self.dropped_images)):
            if counts:
                lines.append(f"{title} {sum(counts.values())}:")
                lines += [f"  {reason}: {n} (e.g. {self.examples.get(reason, '')})" for reason, n in sorted(counts.items())]
        return "\n".join(lines)


@dataclass
class ConvertResult:
    out_dir: str
    unit: str  # what a sample is: "episodes", "documents", "pairs"
    shards: List[ShardInfo]
    stats: Stats
    up_to_date: bool = False  # the output was complete already; nothing was written
    resumed_shards: int = 0  # shards kept from an interrupted run
    action: str = "wrote"  # what was done to the shards ("listed": a manifest over existing tars)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def summary(self) -> str:
        what = f"{self.num_samples} {self.unit} in {self.num_shards} shards"
        if self.up_to_date:
            head = f"{self.out_dir}: up to date ({what}); nothing to do"
        else:
            resumed = f" (resumed after {self.resumed_shards})" if self.resumed_shards else ""
            head = f"{self.out_dir}: {self.action} {what}{resumed}"
        num_skipped, num_dropped = sum(self.stats.skipped.values()), sum(self.stats.dropped_images.values())
        head += f"; read {self.stats.num_read}; skipped {num_skipped}, images dropped {num_dropped}"
        details = self.stats.describe(self.unit)  # one line per reason, with an example
        return f"{head}\n{details}" if details else head


def logger(quiet: bool) -> Callable[[str], None]:
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))


def progress(total: Optional[int], initial: int, unit: str, quiet: bool):
    """tqdm on stderr; off with --quiet or when stderr is not a terminal (logs, CI)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=f" {unit}", desc="convert", file=sys.stderr, mininterval=1.0,
                dynamic_ncols=True, disable=quiet or not sys.stderr.isatty())


def sample_key(text: str) -> str:
    """A tar key from an id: '.', '/' and whitespace would break webdataset's grouping by key."""
    return re.sub(r"[./\\\s]", "_", text) or "_"


# ----------------------------------------------------------------------------------------------
# Journal


def _read_lines(path: str) -> List[Dict]:
    entries = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line torn by a crash ends the journal
    except FileNotFoundError:
        pass
    return entries


class Journal:
    """The progress journal of one output directory (see the module docstring).

    After construction: `complete` (nothing to do), else `shards`, `position` and `stats` to resume
    from (empty, None and zero counts for a fresh start). `owns_shards` says that shard files of our
    naming in the directory are ours to delete (false for a pairs manifest over someone's tars).
    """

    def __init__(self, out_dir: str, params: Dict, *, owns_shards: bool = True, force: bool = False,
                 log: Callable[[str], None] = print):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, JOURNAL_NAME)
        entries = [] if force else _read_lines(self.path)
        if entries and entries[0].get("params") != params:
            log(f"{out_dir}: inputs or options differ from the previous run; starting over")
            entries = []
        shard_entries = [e for e in entries[1:] if "shard" in e]
        kept = []
        for entry in shard_entries:
            if not self._intact(entry):
                log(f"{out_dir}: {entry['shard']} changed since it was written; converting again from there")
                break
            kept.append(entry)
        last = entries[-1] if entries else {}
        self.complete = bool(last.get("complete")) and len(kept) == len(shard_entries) and \
            os.path.isfile(os.path.join(out_dir, MANIFEST_NAME))
        self.shards = [ShardInfo(e["shard"], e["num_samples"], e["sha256"]) for e in kept]
        resume_from = last if self.complete else (kept[-1] if kept else None)
        self.position = resume_from["position"] if resume_from else None
        self.stats = Stats.from_json(resume_from["stats"]) if resume_from else Stats()
        if not self.complete:
            self._restart(params, kept, owns_shards)

    def _intact(self, entry: Dict) -> bool:
        path = os.path.join(self.out_dir, entry["shard"])
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != entry["size"]:
            return False
        # Untouched since written (the cheap check), or the same bytes (e.g. the directory was copied).
        return st.st_mtime_ns == entry["mtime_ns"] or sha256_file(path) == entry["sha256"]

    def _restart(self, params: Dict, kept: List[Dict], owns_shards: bool) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        manifest = os.path.join(self.out_dir, MANIFEST_NAME)
        if os.path.exists(manifest):  # an incomplete output must never look complete
            os.remove(manifest)
        if owns_shards:
            names = {e["shard"] for e in kept}
            for name in os.listdir(self.out_dir):
                if _OUR_SHARD.fullmatch(name) and name not in names:
                    os.remove(os.path.join(self.out_dir, name))
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for entry in [{"params": params}, *kept]:
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, self.path)

    def _append(self, entry: Dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, shard: ShardInfo, position: Any, stats: Stats) -> None:
        """Record a complete shard and where the input stands after its last record."""
        st = os.stat(os.path.join(self.out_dir, shard.name))
        self._append({"shard": shard.name, "num_samples": shard.num_samples, "sha256": shard.sha256,
                      "size": st.st_size, "mtime_ns": st.st_mtime_ns, "position": position, "stats": stats.to_json()})

    def finish(self, position: Any, stats: Stats) -> None:
        self._append({"complete": True, "position": position, "stats": stats.to_json()})


# ----------------------------------------------------------------------------------------------
# The conversion loop


def run_conversion(
    out_dir: str,
    *,
    kind: str,
    corpus: str,
    unit: str,
    params: Dict,
    read: Callable[[Any], Tuple[Optional[int], Iterator[Record]]],
    shard_samples: Optional[int] = 1000,
    shard_mib: float = 256,
    force: bool = False,
    quiet: bool = False,
) -> ConvertResult:
    """Write the records of `read(position)` into shards + manifest in `out_dir`, resuming or
    skipping work as the journal says. `read` opens the inputs (only called when there is work) and
    returns (the number of records when known, for the progress bar; the records from `position`).
    `params` must change whenever the output would (inputs, options)."""
    if shard_samples is not None and shard_samples < 1:
        raise DataToolError(f"--shard-samples {shard_samples}: must be at least 1")
    if shard_mib <= 0:
        raise DataToolError(f"--shard-mib {shard_mib}: must be positive")
    log = logger(quiet)
    params = {"version": JOURNAL_VERSION, "corpus": corpus, "kind": kind, "shard_samples": shard_samples,
              "shard_mib": shard_mib, **params}
    journal = Journal(out_dir, params, force=force, log=log)
    if journal.complete:
        return ConvertResult(out_dir, unit, journal.shards, journal.stats, up_to_date=True)
    resumed = len(journal.shards)
    if resumed:
        log(f"{out_dir}: resuming after {resumed} complete shards ({journal.stats.num_read} {unit} read)")
    stats, position = journal.stats, journal.position
    writer = ShardWriter(out_dir, kind, max_samples=shard_samples, max_bytes=int(shard_mib * (1 << 20)),
                         shards=journal.shards)
    total, records = read(position)
    try:
        with progress(total, stats.num_read, unit, quiet) as bar:
            for record in records:
                position = record.position
                stats.count(record)
                if record.members is not None:
                    shard = writer.write(record.key, record.members)
                    if shard is not None:
                        journal.add(shard, position, stats)
                bar.update(1)
    except BaseException:
        writer.abort()  # the journal still says where the last complete shard ended
        raise
    if stats.num_written == 0:
        raise DataToolError(f"{out_dir}: no {unit} could be converted; read {stats.num_read}\n{stats.describe(unit)}")
    shard = writer.close_shard()
    if shard is not None:
        journal.add(shard, position, stats)
    write_manifest(out_dir, kind, writer.shards, corpus=corpus, stats=stats.to_json())
    journal.finish(position, stats)
    return ConvertResult(out_dir, unit, writer.shards, stats, resumed_shards=resumed)
