"""A loaded, verified model and how it scores one request.

`ServedModel` is immutable once built: the reloader builds a new one off the request path and
swaps a single reference, so a request that picked up a model finishes on it and names its
version. Before the first snapshot is loaded the service serves a prior: every candidate gets
the prior CTR (the ranking is by bid), and responses say `model_status: "prior"`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np
import torch

from ctrloop.core.errors import SnapshotError
from ctrloop.core.features import FeatureEncoder, FeatureSpec
from ctrloop.core.models import CTRModel
from ctrloop.core.snapshot import build_from_snapshot, checksum, decode_snapshot
from ctrloop.io.registry import ModelRecord

log = logging.getLogger(__name__)

Status = Literal["prior", "trained", "pinned"]
WARMUP_ROWS = 64
# What a candidate's pCVR becomes when the head's output for it is not a number: no evidence of
# conversion, so it can never be promoted by a broken prediction (there is no pCVR prior).
NONFINITE_PCVR = 0.0
# (version, output) pairs already logged: a broken row is hit by every request that uses it,
# the counter says how often; the log says once that it happens.
_nonfinite_logged: set[tuple[str, str]] = set()


class RowPosterior(Protocol):
    """What the service needs of ctrloop.core.posterior.LogitPosterior."""

    def row_variance(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, F] posterior variance of each embedding row a candidate uses."""
        ...


@dataclass(frozen=True)
class Prediction:
    pctr: np.ndarray  # [C] sigmoid of the logit (the posterior mean's)
    pcvr: np.ndarray | None = None  # [C] of the asked conversion type (or the one task)
    logit: np.ndarray | None = None  # [C] posterior mean of the logit; None for the prior
    rows: np.ndarray | None = None  # [C, F] the encoded rows that were scored
    row_var: np.ndarray | None = None  # [C, F] their posterior variances, when asked and known
    pcvr_by_type: np.ndarray | None = None  # [C, T] with a per-type pCVR (`cvr_types`)
    logit_var: np.ndarray | None = None  # [C] float64 Sigma(x): row_var summed per candidate


@dataclass(frozen=True)
class ServedModel:
    version: str
    status: Status
    model: CTRModel | None  # None: the prior
    encoder: FeatureEncoder | None
    prior_ctr: float
    record: ModelRecord | None = None
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    cvr: CTRModel | None = None  # the pCVR head published with this version, if any
    cvr_record: ModelRecord | None = None
    # The posterior's variance of every embedding row, computed once at load: a served
    # posterior never changes, and one gather is far cheaper than three torch ops a request.
    row_var_table: np.ndarray | None = None
    # Called with (output, candidates) when a prediction had to be replaced because it was not
    # finite (output: "pctr", "pcvr" or "logit_std"); the service counts these in /metrics.
    on_nonfinite: Callable[[str, int], None] | None = field(default=None, compare=False,
                                                            repr=False)

    @property
    def spec(self) -> FeatureSpec | None:
        return None if self.model is None else self.model.spec

    @property
    def number(self) -> int:
        """The registry version, 0 for the prior."""
        return 0 if self.record is None else self.record.version

    @property
    def cvr_types(self) -> tuple[str, ...]:
        """The conversion types of the pCVR head, one output each; () for a one-task head
        (every conversion counted) or none."""
        return () if self.cvr is None else self.cvr.tasks

    @property
    def posterior(self) -> RowPosterior | None:
        """The GP posterior of the logit published with this model; None for the prior and
        for snapshots from before exploration (ranked by the mean only)."""
        return None if self.model is None else getattr(self.model, "posterior", None)

    def pctr(self, shared: dict[str, Any], user_id: str,
             candidates: list[tuple[str, str, dict[str, Any]]]) -> np.ndarray:
        return self.predict(shared, user_id, candidates, with_cvr=False)[0]

    def predict(self, shared: dict[str, Any], user_id: str,
                candidates: list[tuple[str, str, dict[str, Any]]], with_cvr: bool = True
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """pCTR per candidate and, when a pCVR head is loaded, pCVR (same encoded rows)."""
        p = self.predict_full(shared, user_id, candidates, with_cvr=with_cvr)
        return p.pctr, p.pcvr

    def predict_full(self, shared: dict[str, Any], user_id: str,
                     candidates: list[tuple[str, str, dict[str, Any]]], *,
                     with_cvr: bool = True, with_variance: bool = False,
                     conversion_type: str | None = None) -> Prediction:
        """Everything one request needs from the model: pCTR (and its logit), pCVR when a
        head is loaded (of `conversion_type`, one of `cvr_types`, default the first), and
        with `with_variance` and a posterior, each row's posterior variance (all from the
        same encoded rows)."""
        if self.model is None or self.encoder is None:
            return Prediction(np.full(len(candidates), self.prior_ctr))
        rows_np = self.encoder.encode_request(shared, user_id, candidates)
        rows = torch.from_numpy(rows_np)
        posterior = self.posterior if with_variance else None
        with torch.inference_mode():
            logit = self.model(rows)
            pctr = torch.sigmoid(logit).double().numpy()
            pcvr = by_type = cvr_logit = None
            cvr_col = 0
            if with_cvr and self.cvr is not None:
                cvr_out = self.cvr(rows)
                cvr_logit = cvr_out.numpy()  # checked below: sigmoid hides an infinite logit
                pcvr = torch.sigmoid(cvr_out).double().numpy()
                if pcvr.ndim == 2:
                    by_type = pcvr
                    types = self.cvr.tasks
                    cvr_col = types.index(conversion_type) if conversion_type else 0
                    pcvr = by_type[:, cvr_col]
            row_var = logit_var = None
            if posterior is not None:
                row_var = (self.row_var_table[rows_np] if self.row_var_table is not None
                           else posterior.row_variance(rows).numpy())
                logit_var = row_var.sum(axis=1, dtype=np.float64)
        pred = Prediction(pctr, pcvr, logit.double().numpy(), rows_np, row_var, by_type,
                          logit_var)
        # Snapshots are verified finite at load, but arithmetic can still overflow: a NaN or
        # infinity would serialize as null (breaking the response schema) and sort arbitrarily.
        # One isfinite over each output vector (~1 us for 100 candidates); fixing is rare.
        assert pred.logit is not None
        if not (np.isfinite(pred.logit).all()
                and (cvr_logit is None or np.isfinite(cvr_logit).all())
                and (logit_var is None or np.isfinite(logit_var).all())):
            pred = self._replace_nonfinite(pred, cvr_logit, cvr_col)
        return pred

    def _replace_nonfinite(self, pred: Prediction, cvr_logit: np.ndarray | None,
                           cvr_col: int) -> Prediction:
        """`pred` with every non-finite output replaced: the prior CTR (its logit) for pCTR,
        NONFINITE_PCVR for pCVR, zero variance for a posterior row (no exploration on a row the
        posterior cannot describe). Each replaced kind is counted."""
        assert pred.logit is not None
        changes: dict[str, Any] = {}
        bad = ~np.isfinite(pred.logit)
        if bad.any():
            logit, pctr = pred.logit.copy(), pred.pctr.copy()
            logit[bad] = math.log(self.prior_ctr / (1.0 - self.prior_ctr))
            pctr[bad] = self.prior_ctr
            changes.update(logit=logit, pctr=pctr)
            self._count_nonfinite("pctr", int(bad.sum()))
        if pred.pcvr is not None and cvr_logit is not None:
            ok = np.isfinite(cvr_logit)  # [C] or [C, T], as pcvr_by_type
            bad_rows = ~(ok.all(axis=1) if ok.ndim == 2 else ok)
            if bad_rows.any():
                if pred.pcvr_by_type is not None:
                    by_type = np.where(ok, pred.pcvr_by_type, NONFINITE_PCVR)
                    changes["pcvr_by_type"] = by_type
                    ok_asked = ok[:, cvr_col]
                else:
                    ok_asked = ok
                changes["pcvr"] = np.where(ok_asked, pred.pcvr, NONFINITE_PCVR)
                self._count_nonfinite("pcvr", int(bad_rows.sum()))
        if pred.row_var is not None and pred.logit_var is not None and \
                not np.isfinite(pred.logit_var).all():
            bad_var = ~np.isfinite(pred.logit_var)
            row_var = np.where(np.isfinite(pred.row_var), pred.row_var, 0.0)
            changes.update(row_var=row_var,
                           logit_var=row_var.sum(axis=1, dtype=np.float64))
            self._count_nonfinite("logit_std", int(bad_var.sum()))
        return replace(pred, **changes)

    def _count_nonfinite(self, output: str, n: int) -> None:
        if self.on_nonfinite is not None:
            self.on_nonfinite(output, n)
        if (self.version, output) not in _nonfinite_logged:
            _nonfinite_logged.add((self.version, output))
            log.error("model version %s predicted a non-finite %s for %d candidate(s); "
                      "answered with the prior instead (counted in "
                      "ctrloop_nonfinite_predictions_total; logged once per version)",
                      self.version, output, n)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version, "status": self.status,
                             "loaded_at": self.loaded_at,
                             "load_seconds": round(self.load_seconds, 4)}
        if self.model is None:
            d["prior_ctr"] = self.prior_ctr
            d["note"] = "no model published yet: every candidate gets the prior CTR"
            return d
        assert self.record is not None
        d.update(model=self.model.name, hparams=self.model.hparams,
                 spec_hash=self.model.spec.hash, published_at=self.record.published_at,
                 checksum=self.record.checksum, size_bytes=self.record.size)
        meta = self.record.meta
        for key in ("samples_seen", "positives_seen", "event_time", "metrics", "trainer"):
            if key in meta:
                d[key] = meta[key]
        if self.cvr is not None and self.cvr_record is not None:
            d["pcvr"] = {"model": self.cvr.name, "checksum": self.cvr_record.checksum}
            if self.cvr.tasks:
                d["pcvr"]["conversion_types"] = list(self.cvr.tasks)
                if "metrics_by_type" in self.cvr_record.meta:
                    d["pcvr"]["metrics_by_type"] = self.cvr_record.meta["metrics_by_type"]
        return d


def prior_model(prior_ctr: float) -> ServedModel:
    return ServedModel("prior", "prior", None, None, prior_ctr)


def warmup_rows(spec: FeatureSpec, n: int = WARMUP_ROWS, seed: int = 0) -> torch.Tensor:
    """Inputs a new model must score finitely: all-missing rows and random rows over every
    field's range (so any row of the table can be hit)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor(spec.offsets)
    buckets = torch.tensor([f.buckets for f in spec.fields])
    rand = offsets + (torch.rand(n, spec.num_fields, generator=g) * buckets).long()
    return torch.cat([offsets.unsqueeze(0), rand])


def load_verified(data: bytes, record: ModelRecord, expected_spec: FeatureSpec | None,
                  status: Status, prior_ctr: float,
                  encoder: FeatureEncoder | None = None,
                  extra_rows: torch.Tensor | None = None) -> ServedModel:
    """Bytes from the registry → a model ready to serve, or SnapshotError saying why not.

    Checks, in order: the SHA-256 the trainer recorded, the snapshot format and its weights,
    the feature spec against the one being served (a different spec would change what every
    logged impression means to the trainer), and finite outputs on warm-up inputs (recent real
    requests when given, plus synthetic rows).
    """
    t0 = time.perf_counter()
    if checksum(data) != record.checksum:
        raise SnapshotError(f"version {record.version}: checksum mismatch (corrupt or "
                            "truncated blob)")
    snap = decode_snapshot(data)
    if snap.version != record.version:
        raise SnapshotError(f"version {record.version}: blob says version {snap.version}")
    if expected_spec is not None and not snap.spec.compatible_with(expected_spec):
        raise SnapshotError(
            f"version {record.version}: feature spec {snap.spec.hash} differs from the served "
            f"spec {expected_spec.hash}; restart the service (or change CTRLOOP_FEATURE_SPEC) "
            "to serve a new spec")
    model = build_from_snapshot(snap, inference=True)
    rows = warmup_rows(snap.spec)
    if extra_rows is not None and extra_rows.numel() and extra_rows.shape[1] == rows.shape[1]:
        rows = torch.cat([rows, extra_rows])
    with torch.inference_mode():
        out = model(rows)
    n = rows.shape[0]
    if out.shape != ((n, len(model.tasks)) if model.tasks else (n,)) or \
            not bool(torch.isfinite(out).all()):
        raise SnapshotError(f"version {record.version}: non-finite or misshapen outputs on "
                            "warm-up inputs")
    posterior = getattr(model, "posterior", None)
    if posterior is not None:
        # A NaN or negative variance would turn every explored ranking into noise or errors.
        with torch.inference_mode():
            var = posterior.row_variance(rows)
        if var.shape != rows.shape or not bool((torch.isfinite(var) & (var >= 0)).all()):
            raise SnapshotError(f"version {record.version}: the posterior gives non-finite, "
                                "negative or misshapen variances on warm-up inputs")
    if encoder is None or encoder.spec.hash != snap.spec.hash:
        encoder = FeatureEncoder(snap.spec)  # same spec: keep the warm per-field hash caches
    make_table = getattr(posterior, "variance_table", None)
    table = None if make_table is None else make_table().numpy()
    if table is not None and not (np.isfinite(table).all() and (table >= 0).all()):
        # Served by gather for every row a request uses; warm-up rows reach only a few.
        raise SnapshotError(f"version {record.version}: the posterior's variance table holds "
                            "non-finite or negative values")
    return ServedModel(str(record.version), status, model, encoder, prior_ctr, record,
                       load_seconds=time.perf_counter() - t0, row_var_table=table)
