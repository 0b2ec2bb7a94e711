"""ctrloop/io/jsonl.py: batched reading gives what per-line reading gives (trainer/replay.py
read_events + FeatureEncoder.encode), events, rows, rejects file, counts and encoder stats."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from ctrloop.core.events import Impression, encode_event
from ctrloop.core.features import FeatureEncoder, FeatureSpec
from ctrloop.io.jsonl import REJECT_PAYLOAD_BYTES, iter_events, read_batches
from ctrloop.trainer.replay import REJECT_PAYLOAD_BYTES as REPLAY_PAYLOAD_BYTES
from ctrloop.trainer.replay import read_events
from tests.unit.test_batch import HOSTILE, _stream


def _events_file(tmp_path: Path) -> Path:
    """Valid events with hostile lines, blank lines and unknown feature names among them."""
    good = [encode_event(e, with_type=True) for e in _stream(300)]
    good[7] = good[7].replace(b'"ctx.hour"', b'"ctx.new"')  # an unknown name, counted
    hostile = [h for h in HOSTILE if isinstance(h, bytes | str) and "\n" not in str(h)]
    lines: list[bytes] = []
    for k, line in enumerate(good):
        lines.append(line)
        if k % 17 == 0:
            h = hostile[(k // 17) % len(hostile)]
            lines.append(h.encode("utf-8", "surrogatepass") if isinstance(h, str) else h)
        if k % 50 == 0:
            lines.append(b"   ")
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _spec() -> FeatureSpec:
    # From the unmodified stream: "ctx.new" is unknown to it.
    return FeatureSpec.infer(e for e in _stream(5) if isinstance(e, Impression))


@pytest.mark.parametrize("batch_lines", [1, 7, 64, 1024])
def test_same_as_read_events_and_encode(tmp_path: Path, batch_lines: int) -> None:
    path = _events_file(tmp_path)
    spec = _spec()
    want_rejects, want_counts, one = io.BytesIO(), {}, FeatureEncoder(spec)
    want = [(e, one.encode(e) if isinstance(e, Impression) else None)
            for e in read_events(path, want_rejects, want_counts)]
    got_rejects, got_counts, many = io.BytesIO(), {}, FeatureEncoder(spec)
    got = list(iter_events(path, many, got_rejects, got_counts, batch_lines=batch_lines))
    assert got == want
    assert got_rejects.getvalue() == want_rejects.getvalue()
    assert got_rejects.getvalue().count(b"\n") == want_counts["rejected"] > 0
    assert got_counts == want_counts
    assert many.stats() == one.stats() and many.unknown_features > 0


def test_line_numbers_and_no_encoder(tmp_path: Path) -> None:
    path = tmp_path / "few.jsonl"
    click = b'{"type":"click","impression_id":"a","ts":1767225600.0}'
    path.write_bytes(b"\n".join([click, b"", b"{bad", click, b"[]"]) + b"\n")
    counts: dict[str, int] = {}
    batches = list(read_batches(path, None, None, counts, batch_lines=2))
    assert [b.lines for b in batches] == [[1], [4], []]
    assert all(r is None for b in batches for r in b.rows)
    assert counts == {"lines": 5, "rejected": 2}


def test_reject_payload_is_cut_as_replay_cuts_it(tmp_path: Path) -> None:
    assert REJECT_PAYLOAD_BYTES == REPLAY_PAYLOAD_BYTES
    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"x": "' + b"v" * 70_000 + b'"}\n')
    out = io.BytesIO()
    assert list(iter_events(path, None, out)) == []
    record = orjson.loads(out.getvalue())
    assert record["line"] == 1 and len(record["payload"]) == REJECT_PAYLOAD_BYTES
    assert "at most 65536 allowed" in record["reason"]
