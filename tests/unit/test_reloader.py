"""Verification of snapshots before they are served (ctrloop.service.scoring.load_verified), the
Reloader that follows the registry, and ModelHolder's swap rules."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest
import torch

from ctrloop.core.errors import RegistryError, SnapshotError
from ctrloop.core.features import FeatureEncoder, FeatureSpec, Field
from ctrloop.core.models import CTRModel, build_model
from ctrloop.core.posterior import LogitPosterior, PosteriorConfig
from ctrloop.core.snapshot import checksum, encode_snapshot
from ctrloop.io.registry import InMemoryRegistry, ModelRecord, RegistryCorrupt
from ctrloop.service.reloader import ModelHolder, Reloader
from ctrloop.service.scoring import ServedModel, load_verified, prior_model, warmup_rows

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
def test_load_verified_refuses_non_finite_weights(name: str, bad: float) -> None:
    m = model(1, name=name)
    with torch.no_grad():
        m.bias.fill_(bad)  # type: ignore[operator]
    with pytest.raises(SnapshotError, match="version 1: tensor 'bias' holds 1 non-finite"):
        load(encode_snapshot(m, 1))


@pytest.mark.parametrize("name", ["fwfm", "lr"])
def test_load_verified_refuses_outputs_that_overflow(name: str) -> None:
    """Finite weights whose sums overflow float32: the tensors pass check_finite (its cheap
    sum overflows too, and the exact test clears them), the warm-up outputs do not."""
    m = model(1, name=name)
    with torch.no_grad():
        m.bias.fill_(3e38)  # type: ignore[operator]
        for p in m.parameters():
            if p.dim() == 2:
                p.fill_(3e38)
    with pytest.raises(SnapshotError, match="version 1: non-finite or misshapen outputs"):
        load(encode_snapshot(m, 1))


def test_load_verified_refuses_a_non_finite_row_of_the_table() -> None:
    m = model(1)
    with torch.no_grad():
        m.table.weight[SPEC.offsets[1], 1] = float("nan")  # ctx.device's missing bucket
    with pytest.raises(SnapshotError, match="non-finite"):
        load(encode_snapshot(m, 1))


def test_load_verified_refuses_one_nan_row_no_warmup_input_reaches() -> None:
    """Issue 10 D: one user.id row set to NaN passed verification (warm-up rows miss it) and
    that user was answered "pctr": null. Every tensor is checked at load now."""
    m = model(1)
    hot = SPEC.offsets[0] + 12345  # one user.id bucket out of 65536
    assert hot not in warmup_rows(SPEC)[:, 0].tolist()
    with torch.no_grad():
        m.table.weight[hot, 0] = float("nan")
    with pytest.raises(SnapshotError, match=rf"version 1: tensor 'table.weight' holds 1 "
                                            rf"non-finite values .*the first row {hot}\)"):
        load(encode_snapshot(m, 1))


def test_load_verified_scores_recent_requests_too() -> None:
    """A row no synthetic warm-up input reaches is still caught when real traffic hits it:
    here finite weights whose products overflow float32 for that row only."""
    m = model(1)
    hot = SPEC.offsets[0] + 12345
    with torch.no_grad():
        m.table.weight[hot] = 3e38
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


# ---------------------------------------------------------------------------- issue 10 D, E


def test_a_non_finite_posterior_variance_at_request_time_is_zeroed_and_counted() -> None:
    """The posterior's variance of a row served as NaN (here poisoned after load) gives the
    candidate no exploration width instead of a NaN logit_std; the rest are untouched."""
    m = model(1)
    m.posterior = LogitPosterior(SPEC, PosteriorConfig(field_prior_var={}))
    counted: list[tuple[str, int]] = []
    served = load(encode_snapshot(m, 1))
    served = ServedModel(**{**served.__dict__,
                            "on_nonfinite": lambda o, n: counted.append((o, n))})
    cands = [("a1", "adv1", {}), ("a2", "adv2", {})]
    clean = served.predict_full({}, "u1", cands, with_variance=True)
    assert served.row_var_table is not None and clean.rows is not None
    served.row_var_table[clean.rows[0, 2]] = float("nan")  # a1's ad.id row
    pred = served.predict_full({}, "u1", cands, with_variance=True)
    assert pred.logit_var is not None and clean.logit_var is not None
    assert np.isfinite(pred.logit_var).all()
    assert pred.logit_var[1] == clean.logit_var[1]
    assert pred.logit_var[0] < clean.logit_var[0]  # that row contributes nothing
    np.testing.assert_array_equal(pred.pctr, clean.pctr)
    assert counted == [("logit_std", 1)]


class DamagedRegistry(CountingRegistry):
    """Raises RegistryCorrupt as RedisRegistry does on a malformed pointer."""

    def __init__(self) -> None:
        super().__init__()
        self.bad_current: str | None = None
        self.bad_pinned: str | None = None

    def current(self) -> ModelRecord | None:
        if self.bad_current is not None:
            raise RegistryCorrupt(self.bad_current)
        return super().current()

    def pinned(self) -> int | None:
        if self.bad_pinned is not None:
            raise RegistryCorrupt(self.bad_pinned)
        return super().pinned()


def test_a_damaged_registry_is_counted_and_logged_once_and_serving_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 E: `SET <ns>:current abc` raised ValueError from every poll (a traceback every
    2 s, no failure counted). Now: one count and one log line per distinct problem, the served
    model keeps serving, describe() says what is wrong, and a repair is picked up."""
    reg, rec = DamagedRegistry(), Recorder()
    r = rec.reloader(reg)
    reg.put_model(1)
    assert r.check()
    reg.bad_current = "registry key ctrloop:current holds b'abc', not a version number"
    with caplog.at_level(logging.INFO, logger="ctrloop.service.reloader"):
        for _ in range(5):
            assert not r.check()
        assert r.holder.served.version == "1"
        assert rec.failures == ["registry"]
        assert r.stats.failures == {"registry": 1}
        assert r.stats.registry_ok  # reachable, but damaged
        assert r.describe()["registry_error"] == reg.bad_current
        damaged = [x for x in caplog.records if "damaged" in x.getMessage()]
        assert len(damaged) == 1 and damaged[0].levelno == logging.ERROR
        assert not [x for x in caplog.records if x.exc_info]  # no tracebacks
        reg.bad_current = "another problem"  # a different problem: reported too
        assert not r.check()
        assert rec.failures == ["registry", "registry"]
        reg.bad_current = None  # repaired, with a newer version
        reg.put_model(2)
        assert r.check()
    assert r.holder.served.version == "2"
    assert "registry_error" not in r.describe()
    assert any("readable again" in x.getMessage() for x in caplog.records)


def test_a_damaged_pin_keeps_serving_what_is_served() -> None:
    """With the pin unreadable the operator's intent is unknown: neither current nor any
    other version is loaded until it is repaired."""
    reg, rec = DamagedRegistry(), Recorder()
    r = rec.reloader(reg)
    reg.put_model(1)
    assert r.check()
    reg.put_model(2)
    reg.bad_pinned = "registry key ctrloop:pinned holds b'x', not a version number"
    assert not r.check()
    assert r.holder.served.version == "1"
    assert rec.failures == ["registry"]


def test_a_damaged_registry_on_a_cold_start_serves_the_prior() -> None:
    reg, rec = DamagedRegistry(), Recorder()
    r = rec.reloader(reg)
    reg.bad_current = "ctrloop:current points to version 9, which has no record"
    assert not r.check()
    assert r.holder.served.status == "prior"
    assert rec.failures == ["registry"]


def test_pin_verifies_before_writing_and_unpin_verifies_current_first() -> None:
    """Issue 10 E: a pin of a version that cannot be served wrote the pin anyway (every other
    process then followed it). Reloader.pin/unpin load first and write last."""
    reg, rec = CountingRegistry(), Recorder()
    r = rec.reloader(reg)
    good = reg.put_model(1)
    bad = reg.put(b"not a snapshot")
    assert r.check() is False  # current (bad) refused, the prior stays
    assert r.load(good)
    with pytest.raises(SnapshotError, match=r"not a ctrloop snapshot|truncated"):
        r.pin(bad)
    assert reg.pinned() is None and r.holder.served.version == "1"
    with pytest.raises(RegistryError, match="not in the registry"):
        r.pin(99)
    assert reg.pinned() is None
    served = r.pin(good)
    assert (served.version, served.status, reg.pinned()) == ("1", "pinned", good)
    with pytest.raises(SnapshotError):
        r.unpin()  # current is the bad version: the pin stays
    assert reg.pinned() == good and r.holder.served.status == "pinned"
    newer = reg.put_model(3)
    served = r.unpin()
    assert (served.version, served.status, reg.pinned()) == (str(newer), "trained", None)
