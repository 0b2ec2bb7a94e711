"""Model snapshots: safetensors + spec + metadata; what decodes, and what is refused."""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as st_save

from ctrloop.core.errors import SnapshotError
from ctrloop.core.features import NUMERIC_BUCKETS, FeatureSpec, Field
from ctrloop.core.models import MODELS, CTRModel, build_model
from ctrloop.core.snapshot import (
    FORMAT,
    build_from_snapshot,
    checksum,
    decode_snapshot,
    encode_snapshot,
)

SPEC = FeatureSpec((
    Field("user.age", "categorical", "user", 16),
    Field("ctx.device", "categorical", "context", 8),
    Field("ad.bid", "numeric", "ad", NUMERIC_BUCKETS),
))
NAMES = sorted(MODELS)


def trained(name: str, seed: int = 0) -> CTRModel:
    torch.manual_seed(seed)
    hparams = {"dim": 4} if name == "fwfm" else {}
    model = build_model(name, SPEC, **hparams)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def inputs(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randint(o, o + f.buckets, (n,), generator=g)
                        for o, f in zip(SPEC.offsets, SPEC.fields, strict=True)], dim=1)


def header_of(data: bytes) -> tuple[int, dict[str, Any]]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def with_header(data: bytes, edit: Any) -> bytes:
    """Re-encode the blob with its ctrloop header changed by `edit(dict) -> None`."""
    n, outer = header_of(data)
    inner = json.loads(outer["__metadata__"]["ctrloop"])
    edit(inner)
    outer["__metadata__"]["ctrloop"] = json.dumps(inner)
    raw = json.dumps(outer).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_gives_identical_predictions(name: str) -> None:
    model = trained(name)
    data = encode_snapshot(model, version=7, meta={"learned": 123, "clock": 1767225600.5})
    snap = decode_snapshot(data)
    assert snap.version == 7
    assert snap.model_name == name
    assert snap.hparams == model.hparams
    assert snap.spec == SPEC and snap.spec.hash == SPEC.hash
    assert snap.meta == {"learned": 123, "clock": 1767225600.5}
    rebuilt = build_from_snapshot(snap)
    assert not rebuilt.training
    x = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_encoding_is_deterministic() -> None:
    model = trained("fwfm")
    assert encode_snapshot(model, 1) == encode_snapshot(model, 1)
    assert checksum(encode_snapshot(model, 1)) != checksum(encode_snapshot(model, 2))


def test_header_edit_helper_keeps_a_valid_snapshot() -> None:
    data = encode_snapshot(trained("lr"), 3)
    assert decode_snapshot(with_header(data, lambda h: None)).version == 3  # the helper is sane


@dataclass(frozen=True)
class Corruption:
    name: str
    corrupt: Any  # bytes -> bytes
    message: str


def _set(key: str, value: Any) -> Any:
    return lambda data: with_header(data, lambda h: h.__setitem__(key, value))


def _drop(key: str) -> Any:
    return lambda data: with_header(data, lambda h: h.pop(key))


def _spec_buckets(data: bytes) -> bytes:
    def edit(h: dict[str, Any]) -> None:
        h["spec"]["fields"][0]["buckets"] = 32
    return with_header(data, edit)


def _outer(edit: Any) -> Any:
    def corrupt(data: bytes) -> bytes:
        n, outer = header_of(data)
        edit(outer)
        raw = json.dumps(outer).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    return corrupt


CORRUPTIONS = [
    Corruption("empty", lambda d: b"", "truncated"),
    Corruption("7 bytes", lambda d: d[:7], "truncated"),
    Corruption("header cut", lambda d: d[:40], "truncated (header longer than the data)"),
    Corruption("tensor data cut", lambda d: d[:-5], "corrupt snapshot tensors"),
    Corruption("one byte missing in the middle", lambda d: d[:-100] + d[-99:], "corrupt"),
    Corruption("huge header length", lambda d: (2**63).to_bytes(8, "little") + d[8:], "truncated"),
    Corruption("header not JSON", lambda d: d[:8] + b"#" + d[9:], "not a ctrloop snapshot"),
    Corruption("garbage", lambda d: bytes(range(256)) * 4, "truncated"),
    Corruption("no ctrloop metadata", lambda d: st_save({"w": torch.zeros(2)}),
               "not a ctrloop snapshot"),
    Corruption("other metadata", lambda d: st_save({"w": torch.zeros(2)}, metadata={"a": "b"}),
               "not a ctrloop snapshot"),
    Corruption("ctrloop metadata not JSON",
               lambda d: st_save({"w": torch.zeros(2)}, metadata={"ctrloop": "{"}),
               "not a ctrloop snapshot"),
    Corruption("other format", _set("format", "ctrloop-snapshot/2"), "unsupported snapshot format"),
    Corruption("spec changed, hash kept", _spec_buckets, "does not match its recorded hash"),
    Corruption("wrong spec hash", _set("spec_hash", "0" * 16), "does not match its recorded hash"),
    Corruption("no spec hash", _drop("spec_hash"), "does not match its recorded hash"),
    Corruption("tensor shape changed",
               _outer(lambda o: o["bias"].__setitem__("shape", [2])), "corrupt snapshot tensors"),
    Corruption("tensor dtype changed",
               _outer(lambda o: o["bias"].__setitem__("dtype", "F64")), "corrupt snapshot tensors"),
    Corruption("no version", _drop("version"), "snapshot"),
    Corruption("no model name", _drop("model"), "snapshot"),
    Corruption("no spec", _drop("spec"), "snapshot"),
    Corruption("malformed spec", _set("spec", {"fields": "x"}), "snapshot"),
    Corruption("header a list",
               lambda d: st_save({"w": torch.zeros(2)}, metadata={"ctrloop": "[1]"}), "snapshot"),
]


@pytest.mark.parametrize("case", CORRUPTIONS, ids=lambda c: c.name)
def test_corrupt_snapshots_raise_snapshot_error(case: Corruption) -> None:
    data = encode_snapshot(trained("lr"), 5)
    bad = case.corrupt(data)
    assert bad != data
    with pytest.raises(SnapshotError, match=re.escape(case.message)):
        build_from_snapshot(decode_snapshot(bad))


@dataclass(frozen=True)
class Misfit:
    name: str
    edit: Any  # header dict -> None
    message: str


MISFITS = [
    Misfit("unknown architecture", lambda h: h.__setitem__("model", "dnn"), "do not fit model"),
    Misfit("architecture swapped", lambda h: h.__setitem__("model", "lr"), "do not fit"),
    Misfit("unknown hyper-parameter", lambda h: h["hparams"].__setitem__("depth", 3),
           "do not fit model 'fwfm'"),
    Misfit("other embedding size", lambda h: h["hparams"].__setitem__("dim", 8), "do not fit"),
]


@pytest.mark.parametrize("case", MISFITS, ids=lambda c: c.name)
def test_weights_that_do_not_fit_are_refused(case: Misfit) -> None:
    data = with_header(encode_snapshot(trained("fwfm"), 5), case.edit)
    snap = decode_snapshot(data)
    with pytest.raises(SnapshotError, match=case.message):
        build_from_snapshot(snap)


def test_every_truncation_is_refused() -> None:
    data = encode_snapshot(trained("lr"), 5)
    for cut in [*range(0, 200, 7), *range(200, len(data), max(1, len(data) // 50))]:
        with pytest.raises(SnapshotError):
            decode_snapshot(data[:cut])


_LR_BLOB = encode_snapshot(trained("lr"), 5, meta={"k": "v"})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_flipped_header_byte_is_refused_or_harmless(data: st.DataObject) -> None:
    blob = _LR_BLOB
    n = int.from_bytes(blob[:8], "little")
    pos = data.draw(st.integers(0, 8 + n - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(blob)
    bad[pos] ^= 1 << bit
    try:
        model = build_from_snapshot(decode_snapshot(bytes(bad)))
    except SnapshotError:
        return
    # Decoded anyway (e.g. a flipped bit in padding or in a metadata value): still a model.
    with torch.no_grad():
        assert model(inputs(4)).shape == (4,)


def test_flipped_weight_bytes_are_caught_by_the_checksum() -> None:
    # safetensors has no checksum of its own; the registry's SHA-256 is what verifies weights.
    data = encode_snapshot(trained("lr"), 5)
    bad = bytearray(data)
    bad[-3] ^= 0x40
    assert checksum(bytes(bad)) != checksum(data)


# --- never pickle ---------------------------------------------------------------------------

_EXECUTED: list[str] = []


def _record(tag: str) -> None:
    _EXECUTED.append(tag)


class _Payload:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record, ("unpickled",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_pickle_is_never_loaded(protocol: int) -> None:
    _EXECUTED.clear()
    blob = pickle.dumps({"model": _Payload()}, protocol=protocol)
    with pytest.raises(SnapshotError):
        decode_snapshot(blob)
    assert _EXECUTED == []
    pickle.loads(blob)  # the payload does run when unpickled: the test can tell
    assert _EXECUTED == ["unpickled"]


def test_a_torch_save_file_is_refused() -> None:
    _EXECUTED.clear()
    buf = io.BytesIO()
    torch.save({"state": trained("lr").state_dict(), "x": _Payload()}, buf)
    with pytest.raises(SnapshotError):
        decode_snapshot(buf.getvalue())
    assert _EXECUTED == []


def test_format_constant() -> None:
    _, outer = header_of(_LR_BLOB)
    assert json.loads(outer["__metadata__"]["ctrloop"])["format"] == FORMAT


def _with_posterior(model: CTRModel) -> CTRModel:
    from ctrloop.core.posterior import LogitPosterior, PosteriorConfig

    model.posterior = LogitPosterior(SPEC, PosteriorConfig(field_prior_var={}))
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_value_in_any_tensor_is_refused(name: str, bad: float) -> None:
    """Issue 10 D: one NaN embedding row passed verification (warm-up rows never used it).
    Every tensor of every model kind, the posterior's included, is checked at decode."""
    data = encode_snapshot(_with_posterior(trained(name)), 3)
    tensors = safetensors_load(data)
    header = json.loads(header_of(data)[1]["__metadata__"]["ctrloop"])
    floats = [k for k, t in tensors.items() if t.is_floating_point()]
    assert any(k.startswith("posterior.") for k in floats)
    for key in floats:
        poisoned = {k: t.clone() for k, t in tensors.items()}
        flat = poisoned[key].view(-1)
        flat[flat.numel() // 2] = bad
        blob = st_save(poisoned, metadata={"ctrloop": json.dumps(header)})
        with pytest.raises(SnapshotError, match=rf"^version 3: tensor '{re.escape(key)}' holds 1 "
                                                r"non-finite values"):
            decode_snapshot(blob)


def test_huge_finite_weights_are_not_mistaken_for_non_finite() -> None:
    """The cheap test (a sum) overflows on these; the exact test clears them."""
    model = trained("lr")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3e38)
    assert decode_snapshot(encode_snapshot(model, 1)).version == 1
