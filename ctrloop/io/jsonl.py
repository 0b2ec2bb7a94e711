"""JSON Lines event files read in micro-batches: decoded, validated and encoded column-wise.

What `ctrloop replay` needs from a file, without the per-event Python of decoding and encoding
one line at a time (ctrloop/core/batch.py, FeatureEncoder.encode_batch). The results are those
of the per-line path: the same valid events, the same rejects file byte for byte
({"line", "reason", "payload"}), the same counts, and for each impression the row
`encoder.encode(impression)` would give, with the encoder's stats counted the same.

    encoder = pipe.encoder
    for event, row in iter_events(path, encoder, rejects=rf, counter=counts):
        pipe.process(event, row=row)  # row: None for clicks and conversions

Batches of 128 lines: the column passes re-read every decoded object, which stays in the CPU
caches only for a small batch (measured on the 2-core box: 64-128 lines beat 1024, and 8192
was slower than line by line).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO

import orjson

from ctrloop.core.batch import DecodedBatch, decode_batch
from ctrloop.core.events import Event, Impression
from ctrloop.core.features import FeatureEncoder

REJECT_PAYLOAD_BYTES = 4096  # the first 4 KiB of a rejected line (docs/events.md)
BATCH_LINES = 128
DECODE_LINES = 128

Row = list[int]


@dataclass(slots=True)
class EventBatch:
    """The valid events of consecutive lines, in file order, with their 1-based line numbers
    and (given an encoder) each impression's encoded row; None for clicks and conversions."""

    events: list[Event] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    rows: list[Row | None] = field(default_factory=list)


def read_batches(path: Path, encoder: FeatureEncoder | None = None,
                 rejects: IO[bytes] | None = None, counter: dict[str, int] | None = None,
                 batch_lines: int = BATCH_LINES) -> Iterator[EventBatch]:
    """Batches of the file's valid events; invalid lines go to `rejects` with their reason, as
    trainer/replay.py read_events writes them. `counter` gets "lines" (the last line read, so
    a batch ahead of the consumer) and "rejected"."""
    counts = counter if counter is not None else {}
    counts.setdefault("lines", 0)
    counts.setdefault("rejected", 0)
    first = 1
    with open(path, "rb") as f:
        while chunk := list(islice(f, batch_lines)):
            batch = _batch(chunk, first, encoder, rejects, counts)
            first += len(chunk)
            counts["lines"] = first - 1
            yield batch


def iter_events(path: Path, encoder: FeatureEncoder | None = None,
                rejects: IO[bytes] | None = None, counter: dict[str, int] | None = None,
                batch_lines: int = BATCH_LINES) -> Iterator[tuple[Event, Row | None]]:
    """(event, row) per valid event of the file, in order: `read_batches` one event at a time."""
    for batch in read_batches(path, encoder, rejects, counter, batch_lines):
        yield from zip(batch.events, batch.rows, strict=True)


def _batch(chunk: list[bytes], first: int, encoder: FeatureEncoder | None,
           rejects: IO[bytes] | None, counts: dict[str, int]) -> EventBatch:
    # Blank lines are skipped, not rejected (as read_events does); they are rare.
    blank = not all(map(bytes.strip, chunk))
    lines = [k for k, line in enumerate(chunk) if line.strip()] if blank else None
    decoded = _decode([chunk[k] for k in lines] if lines is not None else chunk)
    if lines is not None:
        decoded.indices = [lines[k] for k in decoded.indices]
        decoded.rejects = [(lines[k], reason) for k, reason in decoded.rejects]
    if decoded.rejects:
        counts["rejected"] += len(decoded.rejects)
        if rejects is not None:
            rejects.write(b"".join(reject_record(first + k, reason, chunk[k])
                                   for k, reason in decoded.rejects))
    batch = EventBatch(decoded.events, [first + k for k in decoded.indices])
    batch.rows = _rows(decoded.events, encoder)
    return batch


def _decode(lines: list[bytes]) -> DecodedBatch:
    """decode_batch in slices of DECODE_LINES, for a caller that asks for bigger batches: its
    column passes re-read every decoded object, which stays in the CPU caches only for a
    slice this small."""
    if len(lines) <= DECODE_LINES:
        return decode_batch(lines)
    out = DecodedBatch()
    for start in range(0, len(lines), DECODE_LINES):
        part = decode_batch(lines[start:start + DECODE_LINES])
        out.events += part.events
        out.indices += [start + k for k in part.indices]
        out.rejects += [(start + k, reason) for k, reason in part.rejects]
    return out


def _rows(events: list[Event], encoder: FeatureEncoder | None) -> list[Row | None]:
    if encoder is None:
        return [None] * len(events)
    imps = [e for e in events if type(e) is Impression]
    encoded = iter(encoder.encode_rows(imps))  # type: ignore[arg-type]
    return [next(encoded) if type(e) is Impression else None for e in events]


def reject_record(line_no: int, reason: str, line: bytes) -> bytes:
    """One line of the rejects file."""
    return orjson.dumps({
        "line": line_no,
        "reason": reason,
        "payload": line[:REJECT_PAYLOAD_BYTES].decode("utf-8", "replace"),
    }) + b"\n"
