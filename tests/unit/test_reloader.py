"""Verification of snapshots before they are served (service.scoring.load_verified), the
Reloader that follows the registry, and ModelHolder's swap rules."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from ctrloop.errors import RegistryError, SnapshotError
from ctrloop.features import FeatureEncoder, FeatureSpec, Field
from ctrloop.models import CTRModel, build_model
from ctrloop.registry import InMemoryRegistry, ModelRecord
from ctrloop.snapshot import checksum, encode_snapshot
from service.reloader import ModelHolder, Reloader
from service.scoring import ServedModel, load_verified, prior_model, warmup_rows

SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 1 << 16),
    Field("ctx.device", "categorical", "context", 8),
    Field("ad.id", "categorical", "ad", 256),
))
OTHER_SPEC = FeatureSpec((*SPEC.fields, Field("ad.category", "categorical", "ad", 32)))
PRIOR = 0.03


def model(seed: int = 0, spec: FeatureSpec = SPEC, name: str = "fwfm") -> CTRModel:
    torch.manual_seed(seed)
    m = build_model(name, spec, **({"dim": 4} if name == "fwfm" else {}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def record_for(data: bytes, version: int = 1) -> ModelRecord:
    return ModelRecord(version, checksum(data), len(data), 1767225600.0, {})


def load(data: bytes, version: int = 1, expected: FeatureSpec | None = SPEC,
         **kwargs: Any) -> ServedModel:
    return load_verified(data, record_for(data, version), expected, "trained", PRIOR, **kwargs)


# ---------------------------------------------------------------------------- load_verified


def test_load_verified_serves_what_the_trainer_published() -> None:
    m = model(1)
    data = encode_snapshot(m, 7, {"samples_seen": 5})
    served = load(data, 7)
    assert (served.version, served.number, served.status) == ("7", 7, "trained")
    assert served.spec == SPEC
    assert served.record is not None and served.record.checksum == checksum(data)
    assert not served.model.training  # type: ignore[union-attr]
    shared = {"ctx.device": "ios"}
    cands = [("a1", "adv1", {}), ("a2", "adv2", {})]
    rows = FeatureEncoder(SPEC).encode_request(shared, "u1", cands)
    with torch.inference_mode():
        want = torch.sigmoid(m(torch.from_numpy(rows))).double().numpy()
    np.testing.assert_allclose(served.pctr(shared, "u1", cands), want, rtol=1e-6)


def test_load_verified_refuses_a_checksum_mismatch() -> None:
    data = encode_snapshot(model(1), 1)
    other = encode_snapshot(model(2), 1)
    with pytest.raises(SnapshotError, match=r"version 1: checksum mismatch \(corrupt or "
                                            r"truncated blob\)"):
        load_verified(other, record_for(data), SPEC, "trained", PRIOR)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        load_verified(bytes(flipped), record_for(data), SPEC, "trained", PRIOR)
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        load_verified(data[:-10], record_for(data), SPEC, "trained", PRIOR)


def _corrupt_header(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return data[:8] + b"#" * n + data[8 + n:]


CORRUPT: dict[str, tuple[Any, str]] = {
    "empty": (lambda d: b"", "truncated"),
    "four-bytes": (lambda d: d[:4], "truncated"),
    "half": (lambda d: d[: len(d) // 2], "truncated|corrupt"),
    "header-only": (lambda d: d[: 8 + int.from_bytes(d[:8], "little")], "corrupt"),
    "not-a-snapshot": (lambda d: b"hello world, not a snapshot at all", "truncated|not a ctrloop"),
    "garbled-header": (_corrupt_header, "not a ctrloop snapshot"),
    "pickle": (lambda d: b"\x80\x04\x95" + d[3:], "truncated|not a ctrloop"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_load_verified_refuses_a_corrupt_blob(case: str) -> None:
    """The checksum matches (the trainer published these bytes), the content is broken."""
    corrupt, message = CORRUPT[case]
    data = corrupt(encode_snapshot(model(1), 1))
    with pytest.raises(SnapshotError, match=message):
        load(data)


def test_load_verified_refuses_another_feature_spec() -> None:
    data = encode_snapshot(model(1, OTHER_SPEC), 3)
    with pytest.raises(SnapshotError) as e:
        load(data, 3, expected=SPEC)
    msg = str(e.value)
    assert msg.startswith("version 3: feature spec")
    assert OTHER_SPEC.hash in msg and SPEC.hash in msg
    assert "CTRLOOP_FEATURE_SPEC" in msg
    assert load(data, 3, expected=OTHER_SPEC).spec == OTHER_SPEC
    assert load(data, 3, expected=None).spec == OTHER_SPEC


def test_load_verified_refuses_a_blob_of_another_version() -> None:
    data = encode_snapshot(model(1), 4)
    with pytest.raises(SnapshotError, match="version 5: blob says version 4"):
        load(data, 5)


@pytest.mark.parametrize("name", ["fwfm", "lr"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_load_verified_refuses_non_finite_outputs(name: str, bad: float) -> None:
    m = model(1, name=name)
    with torch.no_grad():
        m.bias.fill_(bad)  # type: ignore[operator]
    with pytest.raises(SnapshotError, match="version 1: non-finite or misshapen outputs"):
        load(encode_snapshot(m, 1))


def test_load_verified_refuses_a_non_finite_row_of_the_table() -> None:
    m = model(1)
    with torch.no_grad():
        m.table.weight[SPEC.offsets[1], 1] = float("nan")  # ctx.device's missing bucket
    with pytest.raises(SnapshotError, match="non-finite"):
        load(encode_snapshot(m, 1))


def test_load_verified_scores_recent_requests_too() -> None:
    """A row no synthetic warm-up input reaches is still caught when real traffic hits it."""
    m = model(1)
    hot = SPEC.offsets[0] + 12345  # one user.id bucket out of 65536
    assert hot not in warmup_rows(SPEC)[:, 0].tolist()
    with torch.no_grad():
        m.table.weight[hot, 0] = float("inf")
    data = encode_snapshot(m, 1)
    assert load(data).number == 1  # synthetic rows alone miss it
    recent = torch.tensor([[hot, SPEC.offsets[1] + 1, SPEC.offsets[2] + 1]])
    with pytest.raises(SnapshotError, match="non-finite"):
        load(data, extra_rows=recent)
    wrong_width = torch.tensor([[hot, SPEC.offsets[1] + 1]])
    assert load(data, extra_rows=wrong_width).number == 1  # rows of another spec are ignored


def test_load_verified_keeps_the_encoder_of_the_same_spec() -> None:
    enc = FeatureEncoder(SPEC)
    assert load(encode_snapshot(model(1), 1), encoder=enc).encoder is enc
    other = FeatureEncoder(OTHER_SPEC)
    served = load(encode_snapshot(model(1), 1), encoder=other)
    assert served.encoder is not other and served.encoder.spec == SPEC  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- ModelHolder


def served(version: int, status: str = "trained", spec: FeatureSpec = SPEC) -> ServedModel:
    data = encode_snapshot(model(version, spec), version)
    return load_verified(data, record_for(data, version), None, status, PRIOR)  # type: ignore[arg-type]


def test_holder_starts_with_the_prior() -> None:
    h = ModelHolder(0.05)
    assert h.served.version == "prior" and h.served.number == 0 and h.served.status == "prior"
    assert h.served.pctr({}, "u", [("a", "b", {})] * 3).tolist() == [0.05] * 3
    assert h.expected_spec is None
    assert h.recent_rows() is None


def test_holder_swaps_forward_only() -> None:
    h = ModelHolder(PRIOR)
    v2, v3 = served(2), served(3)
    assert h.swap(v2)
    assert h.served is v2
    assert not h.swap(served(2))  # same version
    assert not h.swap(served(1))  # older
    assert h.served is v2
    assert h.swap(v3)
    assert h.served is v3
    assert h.swap(served(1), allow_older=True)  # an operator's pin
    assert h.served.number == 1


def test_holder_leaves_a_pin_for_anything() -> None:
    h = ModelHolder(PRIOR)
    assert h.swap(served(5))
    assert h.swap(served(2, "pinned"), allow_older=True)
    assert h.swap(served(2))  # unpinned: the same version, now followed again
    assert h.served.status == "trained"
    assert not h.swap(served(1))


def test_first_trained_model_fixes_the_expected_spec() -> None:
    h = ModelHolder(PRIOR)
    assert h.swap(served(1))
    assert h.expected_spec == SPEC
    assert h.swap(served(2, spec=OTHER_SPEC))  # swap itself does not check specs...
    assert h.expected_spec == SPEC  # ...and does not move the expectation
    fixed = ModelHolder(PRIOR, OTHER_SPEC)
    assert fixed.swap(served(1))
    assert fixed.expected_spec == OTHER_SPEC


def test_holder_keeps_recent_rows_bounded() -> None:
    h = ModelHolder(PRIOR)
    for k in range(20):
        h.remember_rows(np.full((50, 3), k, dtype=np.int64))
    rows = h.recent_rows()
    assert rows is not None
    assert rows.shape == (256, 3)  # 8 chunks of 32 rows kept, 256 used
    assert rows[0, 0].item() == 12  # the oldest kept chunk


# ---------------------------------------------------------------------------- Reloader


class CountingRegistry(InMemoryRegistry):
    """The in-memory registry, counting fetches; `stale` pretends its pointer went back."""

    def __init__(self) -> None:
        super().__init__(keep=10)
        self.fetches: list[int] = []
        self.stale: int | None = None
        self.down = False
        self.lose_blob: set[int] = set()

    def current(self) -> ModelRecord | None:
        if self.down:
            raise RegistryError("registry unreachable: connection refused")
        if self.stale is not None:
            return self.record(self.stale)
        return super().current()

    def fetch(self, version: int) -> bytes:
        self.fetches.append(version)
        if version in self.lose_blob:
            raise RegistryError(f"model version {version} is not in the registry")
        return super().fetch(version)

    def put(self, data: bytes) -> int:
        v = self.next_version()
        self.publish(v, data, {"samples_seen": v})
        return v

    def put_model(self, seed: int, spec: FeatureSpec = SPEC) -> int:
        v = self.next_version()
        self.publish(v, encode_snapshot(model(seed, spec), v), {"samples_seen": v})
        return v


class Recorder:
    def __init__(self) -> None:
        self.swaps: list[str] = []
        self.failures: list[str] = []

    def reloader(self, registry: CountingRegistry, holder: ModelHolder | None = None,
                 poll_s: float = 60.0) -> Reloader:
        return Reloader(registry, holder or ModelHolder(PRIOR), poll_s,
                        on_swap=lambda s: self.swaps.append(s.version),
                        on_failure=self.failures.append)


def test_reloader_follows_newer_versions() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    assert not r.check()  # nothing published: the prior stays
    assert r.holder.served.status == "prior"
    assert r.stats.registry_ok
    for seed in (1, 2, 3):
        v = reg.put_model(seed)
        assert r.check()
        assert r.holder.served.version == str(v)
        assert r.holder.served.status == "trained"
        assert not r.check()  # up to date: nothing fetched again
    assert rec.swaps == ["1", "2", "3"]
    assert reg.fetches == [1, 2, 3]
    assert r.stats.reloads == 3
    assert rec.failures == []


def test_reloader_skips_to_the_newest() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    for seed in range(1, 5):
        reg.put_model(seed)
    assert r.check()
    assert rec.swaps == ["4"]
    assert reg.fetches == [4]


def test_reloader_never_goes_backwards_without_a_pin() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    reg.put_model(1)
    reg.put_model(2)
    assert r.check()
    reg.stale = 1  # e.g. a registry restored from an old backup
    assert not r.check()
    assert r.holder.served.version == "2"
    assert reg.fetches == [2]


def test_reloader_refuses_a_bad_version_once_and_keeps_serving() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    reg.put_model(1)
    assert r.check()
    bad = reg.put(b"\x00" * 100)
    for _ in range(5):  # every poll: no retry storm
        assert not r.check()
    assert reg.fetches == [1, bad]
    assert rec.failures == ["invalid"]
    assert r.stats.failures == {"invalid": 1}
    assert r.stats.refused == [bad]
    assert "not a ctrloop snapshot" in (r.stats.last_error or "")
    assert r.holder.served.version == "1"
    incompatible = reg.put_model(3, OTHER_SPEC)
    assert not r.check() and not r.check()
    assert r.stats.refused == [bad, incompatible]
    assert rec.failures == ["invalid", "invalid"]
    assert "differs from the served spec" in (r.stats.last_error or "")
    assert r.holder.served.version == "1"
    good = reg.put_model(4)
    assert r.check()
    assert r.holder.served.version == str(good)
    assert r.describe()["refused_versions"] == [bad, incompatible]


def test_reloader_retries_a_fetch_failure() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    v = reg.put_model(1)
    reg.lose_blob.add(v)
    assert not r.check()
    assert rec.failures == ["fetch"]
    assert r.holder.served.status == "prior"
    reg.lose_blob.clear()  # transient: tried again on the next poll
    assert r.check()
    assert r.holder.served.version == str(v)
    assert reg.fetches == [v, v]


def test_reloader_survives_an_unreachable_registry() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    reg.put_model(1)
    assert r.check()
    reg.down = True
    assert not r.check()
    assert r.stats.registry_ok is False
    assert r.holder.served.version == "1"
    reg.down = False
    reg.put_model(2)
    assert r.check()
    assert r.stats.registry_ok is True


def test_reloader_follows_pin_and_unpin() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    for seed in (1, 2, 3):
        reg.put_model(seed)
    assert r.check()
    reg.pin(1)
    assert r.check()
    assert (r.holder.served.version, r.holder.served.status) == ("1", "pinned")
    assert r.pinned == 1
    reg.put_model(4)  # ignored while pinned
    assert not r.check()
    assert r.holder.served.version == "1"
    reg.pin(3)  # from one pin to another, forwards
    assert r.check()
    assert (r.holder.served.version, r.holder.served.status) == ("3", "pinned")
    reg.pin(2)  # and backwards
    assert r.check()
    assert r.holder.served.version == "2"
    reg.unpin()
    assert r.check()
    assert (r.holder.served.version, r.holder.served.status) == ("4", "trained")
    assert r.pinned is None
    assert rec.swaps == ["3", "1", "3", "2", "4"]


def test_pinning_the_served_version_marks_it_pinned_and_unpinning_unmarks_it() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    reg.put_model(1)
    assert r.check()
    reg.pin(1)
    assert r.check()
    assert (r.holder.served.version, r.holder.served.status) == ("1", "pinned")
    reg.unpin()
    assert r.check()
    assert (r.holder.served.version, r.holder.served.status) == ("1", "trained")
    assert not r.check()


def test_a_pinned_version_that_fails_verification_is_not_served() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    reg.put_model(1)
    assert r.check()
    bad = reg.put(b"garbage")
    reg.pin(bad)
    assert not r.check() and not r.check()
    assert r.holder.served.version == "1"
    assert rec.failures == ["invalid"]


def test_reloader_thread_picks_up_a_publication() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg, poll_s=0.02)
    r.start()
    try:
        v = reg.put_model(1)
        deadline = time.monotonic() + 10
        while r.holder.served.number != v and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.holder.served.version == str(v)
    finally:
        r.stop()
    assert all(not t.is_alive() for t in r._threads)


def test_reloader_thread_survives_an_unexpected_error() -> None:
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg, poll_s=0.02)
    calls = []

    def boom(version: int) -> ModelRecord | None:
        calls.append(version)
        if len(calls) == 1:
            raise ValueError("unexpected")
        return InMemoryRegistry.record(reg, version)

    reg.record = boom  # type: ignore[method-assign]
    reg.put_model(1)
    r.start()
    try:
        deadline = time.monotonic() + 10
        while r.holder.served.number != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.holder.served.version == "1"
    finally:
        r.stop()
    assert len(calls) >= 2


def test_prior_model_is_a_served_model() -> None:
    p = prior_model(0.2)
    assert p.describe()["prior_ctr"] == 0.2
    assert p.spec is None and p.encoder is None
