"""Collapse and entanglement analysis of a model's embeddings (paper §7; method notes §3).

Dimensional collapse. For each field and each embedding table the field looks up, the field's
embedding matrix has one row per bucket the model *trained*; its rows are L2-normalised (as the
authors' analysis does: the spectrum then measures directions, not how often a value was seen)
and its singular values sigma_1 >= ... >= sigma_D give the Information Abundance

    IA = sum_k sigma_k / sigma_1          (1 <= IA <= min(rows, D))

IA is 1 when every row points the same way (fully collapsed: the field spans one direction) and
D when the rows spread evenly over all D dimensions.

Which rows count. A hashed table holds one row per bucket, most of which no value ever hashed to:
those rows are their random initialisation, isotropic noise that would make any field look
abundant. A row counts when it was trained; the evidence, in this order:
1. the table's zero-initialised columns that are not embeddings — the linear weight of FwFM,
   GwPFM and the multi-embedding model (column 0), STEM's per-task linear columns: a row was
   trained where one is non-zero (its gradient is dloss/dlogit, non-zero for every sample, and
   the first Adagrad step moves it by the learning rate). Exact for a single-task model, and
   in a published snapshot too (no optimizer state travels); ~1 ms over the simulator's 340k
   rows where (2) costs ~11 ms (it reads the whole [rows, D] accumulator). A table with one
   such column per embedding view (STEM's task table: w_t beside e_t) pairs them, so task t's
   rows count where task t trained them;
2. the Adagrad accumulator of the table's columns (the live trainer, a checkpoint): a row was
   trained iff it accumulated a non-zero squared gradient, the optimizer's own record;
3. otherwise: a row whose L2 norm exceeds init_std * (sqrt(D) + `INIT_SIGMAS`), D its width:
   Adagrad's first step moves every coordinate with a gradient by the learning rate (0.05 by
   default, 5x the 0.01 init), so a trained row's norm is ~5 init_std sqrt(D), while an
   untouched row's norm is init_std times a chi with D degrees of freedom (mean ~sqrt(D), sd
   ~0.7), past the threshold with probability < 1e-6 for any D. It assumes the learning rate
   is several times the init scale (the defaults); (1) and (2) need no such assumption.
Evidence that marks no row at all (a fresh table, or an accumulator never loaded: a model
rebuilt from a snapshot) passes to the next.

Cost. The spectrum of an [n, D] matrix comes from the eigenvalues of its D x D Gram matrix
(n D^2 flops, no n x n work); above `max_rows` trained rows a field is subsampled with a stride
over its trained buckets (hashing spreads values uniformly, so a stride is a random sample).
Singular values grow as sqrt(n) together, so IA, a ratio, does not depend on n.

Feature-label mutual information (`mutual_information`): the plug-in estimate per field over a
sample of encoded rows, with the Miller-Madow bias (|X|-1)(|Y|-1)/(2N) nats subtracted: a
high-cardinality field (user ids) seen a few times per value otherwise looks informative.

Interest entanglement (`entanglement_report`): for a multi-task model, pairs (user, ad) that are
*contradictory* — positive for task a, negative for task b — must look close in task a's
embedding space and far in task b's. A shared embedding gives both tasks one distance, so it
cannot (gap 0); task-specific embeddings (STEM) can.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctrloop.core.features import FeatureSpec
from ctrloop.core.models.base import CTRModel, HashEmbedding

INIT_SIGMAS = 4.0
DEFAULT_MAX_ROWS = 4096


# --- spectra and Information Abundance --------------------------------------------------------


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; all-zero rows dropped (they have no direction)."""
    x = x.to(torch.float64)
    norms = x.norm(dim=1)
    keep = norms > 0
    return x[keep] / norms[keep, None]


def singular_values(x: torch.Tensor, normalize: bool = True) -> np.ndarray:
    """Singular values of `x` [n, D], descending (D of them; zeros where the rank is lower).

    From the D x D Gram matrix in float64: sigma_k = sqrt(eig_k(x^T x)); n D^2 work instead
    of an SVD's n D^2 with a larger constant and an [n, D] copy."""
    if x.dim() != 2:
        raise ValueError(f"expected a matrix [rows, dim], got shape {tuple(x.shape)}")
    x = normalize_rows(x) if normalize else x.to(torch.float64)
    if x.shape[0] == 0:
        return np.zeros(x.shape[1])
    eig = torch.linalg.eigvalsh(x.T @ x)
    # Round-off of the Gram matrix leaves ~eps * max eigenvalues where the rank ends; below
    # this floor (sigma_k / sigma_1 < ~3e-7) a direction is no direction.
    eig = torch.where(eig > eig.max() * 1e-13, eig, torch.zeros_like(eig))
    return np.sort(eig.sqrt().numpy())[::-1].copy()


def information_abundance(sv: Sequence[float] | np.ndarray) -> float:
    """sum(sigma) / max(sigma); 0 for an empty or all-zero spectrum (no trained rows)."""
    s = np.asarray(sv, dtype=np.float64)
    top = float(s.max()) if s.size else 0.0
    return float(s.sum() / top) if top > 0 else 0.0


def trained_rows(weight: torch.Tensor, accumulator: torch.Tensor | None = None,
                 zero_init_columns: torch.Tensor | None = None,
                 init_std: float | None = None) -> torch.Tensor:
    """Bool [rows]: which rows of a table were trained (module docstring, "Which rows count"):
    the zero-initialised columns, else the accumulator, else the distance from the init."""
    for evidence in (zero_init_columns, accumulator):
        if evidence is None or evidence.shape[0] != weight.shape[0]:
            continue
        mask = evidence.ne(0).any(dim=1) if evidence.dim() == 2 else evidence.ne(0)
        if bool(mask.any()):
            return mask
    if init_std is None or init_std <= 0:
        return weight.ne(0).any(dim=1)  # zero-initialised table: anything non-zero moved
    return weight.norm(dim=1) > init_std * (math.sqrt(weight.shape[1]) + INIT_SIGMAS)


def strided_sample(idx: torch.Tensor, max_rows: int | None) -> torch.Tensor:
    """At most `max_rows` of `idx`, evenly strided (deterministic: publications compare)."""
    n = idx.numel()
    if max_rows is None or n <= max_rows:
        return idx
    step = math.ceil(n / max_rows)
    return idx[::step]


@dataclass(frozen=True)
class FieldMatrix:
    """One field's rows of one embedding table, and which of them were trained."""

    table: str
    field: str
    weight: torch.Tensor  # [rows, D]: embedding columns only (no linear weight)
    trained: torch.Tensor  # bool [rows]


@dataclass(frozen=True)
class FieldSpectrum:
    table: str
    field: str
    rows: int  # buckets of the field in the table
    rows_trained: int
    rows_used: int  # after subsampling
    singular_values: tuple[float, ...]  # of the L2-normalised trained rows, descending

    @property
    def dim(self) -> int:
        return len(self.singular_values)

    @property
    def ia(self) -> float:
        return information_abundance(self.singular_values)

    @property
    def ia_max(self) -> int:
        """The largest IA these rows could have: min(rows used, D). A field with 2 values
        trained has IA <= 2 however healthy it is."""
        return min(self.rows_used, self.dim)

    def normalized_spectrum(self) -> list[float]:
        """sigma_k / sigma_1: the curve the plot draws."""
        top = self.singular_values[0] if self.singular_values else 0.0
        return [s / top if top > 0 else 0.0 for s in self.singular_values]

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "field": self.field, "rows": self.rows,
                "rows_trained": self.rows_trained, "rows_used": self.rows_used,
                "ia": self.ia, "ia_max": self.ia_max, "dim": self.dim,
                "singular_values": list(self.singular_values)}


def field_spectrum(m: FieldMatrix, max_rows: int | None = DEFAULT_MAX_ROWS) -> FieldSpectrum:
    idx = strided_sample(m.trained.nonzero().flatten(), max_rows)
    sv = singular_values(m.weight.index_select(0, idx))
    return FieldSpectrum(m.table, m.field, int(m.weight.shape[0]), int(m.trained.sum()),
                         int(idx.numel()), tuple(float(s) for s in sv))


def field_spectra(matrices: Iterable[FieldMatrix],
                  max_rows: int | None = DEFAULT_MAX_ROWS) -> list[FieldSpectrum]:
    return [field_spectrum(m, max_rows) for m in matrices]


# --- where a model keeps each field's embeddings ----------------------------------------------


@dataclass(frozen=True)
class _Place:
    """Where a view lies in its HashEmbedding: the module, its name, rows and columns."""

    module: HashEmbedding
    name: str
    rows: slice
    cols: slice


_Modules = Mapping[int, list[tuple[str, HashEmbedding]]]


def _hash_modules(model: CTRModel) -> dict[int, list[tuple[str, HashEmbedding]]]:
    out: dict[int, list[tuple[str, HashEmbedding]]] = {}
    for n, m in model.named_modules():
        if isinstance(m, HashEmbedding):
            out.setdefault(m.weight.untyped_storage().data_ptr(), []).append((n, m))
    return out


def _place(view: torch.Tensor, modules: _Modules) -> _Place | None:
    """The table a view of `CTRModel.field_embeddings()` reads, found by its storage and
    offset (the views carry no name), or None when it is not a view of a HashEmbedding."""
    if view.dim() != 2 or view.stride(1) != 1:
        return None
    at = view.storage_offset()
    owners = [(n, m) for n, m in modules.get(view.untyped_storage().data_ptr(), [])
              if m.weight.storage_offset() <= at < m.weight.storage_offset() + m.weight.numel()]
    if not owners:
        return None
    name, module = owners[0]
    stride = module.weight.stride(0)
    offset = view.storage_offset() - module.weight.storage_offset()
    r, c = divmod(offset, stride)
    return _Place(module, name, slice(r, r + view.shape[0]), slice(c, c + view.shape[1]))


def table_names(model: CTRModel) -> list[str]:
    """A name per `embedding_tables()` entry: the module's name, with a suffix where one
    module holds several (STEM: the task; otherwise the index within the module)."""
    modules = _hash_modules(model)
    places = [_place(t, modules) for t in model.embedding_tables()]
    names = [p.name if p is not None else f"table{i}" for i, p in enumerate(places)]
    out: list[str] = []
    for i, name in enumerate(names):
        same = [j for j, n in enumerate(names) if n == name]
        if len(same) == 1:
            out.append(name)
        elif model.tasks and len(same) == len(model.tasks) and name != "table":
            out.append(f"{name}.{model.tasks[same.index(i)]}")
        else:
            out.append(f"{name}.{same.index(i)}")
    return out


def model_field_matrices(model: CTRModel, use_accumulator: bool = True,
                         accumulators: Sequence[torch.Tensor] | None = None
                         ) -> list[FieldMatrix]:
    """Per field and embedding table (`CTRModel.field_embeddings()`), its rows and which of
    them were trained (module docstring, "Which rows count"):
    - the table's columns no view covers: the zero-initialised linear weights (where there
      are as many as the table has views, view k's own: STEM's task t rows and its linear
      weight w_t learn from task t's samples only);
    - else the Adagrad accumulator of the view's own columns: `accumulators` (a checkpoint's,
      in `model.hash_embeddings()` order), else the table's own (the live trainer's) unless
      `use_accumulator` is False; an empty one (a model built for inference) does not count;
    - else the distance from the random init (`init_std` from the hyper-parameters)."""
    modules = _hash_modules(model)
    given: dict[int, torch.Tensor] = {}
    if accumulators is not None:
        given = {id(t): a for t, a in zip(model.hash_embeddings(), accumulators, strict=True)}
    names = table_names(model)
    tables = model.embedding_tables()
    covered: dict[int, set[int]] = {}
    views_of: dict[int, list[int]] = {}  # per module: its views' first columns, in order
    for t in tables:
        p = _place(t, modules)
        if p is not None:
            covered.setdefault(id(p.module), set()).update(range(p.cols.start, p.cols.stop))
            views_of.setdefault(id(p.module), []).append(p.cols.start)
    init_std = float(model.hparams.get("init_std", 0.01))
    masks: dict[tuple[int, int, int], torch.Tensor] = {}  # per (table, columns): all rows

    def trained(p: _Place) -> torch.Tensor:
        key = (id(p.module), p.cols.start, p.cols.stop)
        if key not in masks:
            w = p.module.weight.detach()
            acc = given.get(id(p.module), p.module.accumulator if use_accumulator else None)
            if acc is not None and acc.shape != w.shape:
                acc = None
            free = [c for c in range(w.shape[1]) if c not in covered[id(p.module)]]
            starts = sorted(views_of[id(p.module)])
            if len(free) > 1 and len(free) == len(starts):
                # One linear column per view (STEM's task table [w_1..w_T | e_1..e_T]): view
                # k learns from the same samples as column k, and only from those.
                free = [free[starts.index(p.cols.start)]]
            masks[key] = trained_rows(w[:, p.cols], None if acc is None else acc[:, p.cols],
                                      w[:, free] if free else None, init_std)
        return masks[key][p.rows]

    out: list[FieldMatrix] = []
    for fname, views in model.field_embeddings().items():
        for k, v in enumerate(views):
            p = _place(v, modules)
            mask = trained(p) if p is not None else trained_rows(v, None, None, init_std)
            out.append(FieldMatrix(names[k], fname, v, mask))
    return out


ALL_TABLES = "all"


def concatenated(matrices: Sequence[FieldMatrix]) -> list[FieldMatrix]:
    """Per field with several tables: one matrix of its rows in every table side by side,
    each table's part L2-normalised first (so each table weighs the same), over the rows
    trained in all of them; table name `ALL_TABLES`. What the field's whole representation
    spans: T tables in the same subspace give the IA of one, T tables in different ones up
    to T times it."""
    by_field: dict[str, list[FieldMatrix]] = {}
    for m in matrices:
        by_field.setdefault(m.field, []).append(m)
    out = []
    for name, ms in by_field.items():
        if len(ms) < 2:
            continue
        parts = []
        for m in ms:
            norms = m.weight.to(torch.float64).norm(dim=1, keepdim=True).clamp_min(1e-30)
            parts.append(m.weight.to(torch.float64) / norms)
        trained = torch.stack([m.trained for m in ms]).all(dim=0)
        out.append(FieldMatrix(ALL_TABLES, name, torch.cat(parts, dim=1), trained))
    return out


def collapse_report(model: CTRModel, max_rows: int | None = DEFAULT_MAX_ROWS,
                    use_accumulator: bool = True,
                    accumulators: Sequence[torch.Tensor] | None = None,
                    all_tables: bool = False) -> list[FieldSpectrum]:
    """Per table, per field (tables in `embedding_tables()` order, fields in spec order);
    `all_tables`: then, for a model with several tables, each field's tables side by side
    (`concatenated`)."""
    with torch.no_grad():
        matrices = model_field_matrices(model, use_accumulator, accumulators)
        if all_tables:
            matrices = matrices + concatenated(matrices)
        spectra = field_spectra(matrices, max_rows)
    order = {n: i for i, n in enumerate([*table_names(model), ALL_TABLES])}
    return sorted(spectra, key=lambda s: order[s.table])  # stable: fields stay in spec order


def compact(spectra: Sequence[FieldSpectrum]) -> dict[str, dict[str, dict[str, float]]]:
    """{table: {field: {"ia", "rows"}}}: small enough for every snapshot's metadata."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for s in spectra:
        out.setdefault(s.table, {})[s.field] = {"ia": round(s.ia, 4), "rows": s.rows_trained}
    return out


class CollapseWatch:
    """IA per field of a live model, for the metadata of each snapshot it publishes.

    `update` recomputes it every `every` calls (publications; 0: never) and keeps the last
    result in between, so a snapshot always carries the newest IA computed, with the
    publication it was computed at. Cost at the defaults (max_rows 2048, one thread): ~4 ms
    on the simulator's FwFM (340k rows x 16), next to the tens of ms of encoding the snapshot.

    >>> from ctrloop.core.features import FeatureSpec, Field
    >>> from ctrloop.core.models import build_model
    >>> spec = FeatureSpec((Field("user.id", "categorical", "user", 16),))
    >>> watch = CollapseWatch(every=2)
    >>> sorted(watch.update(build_model("fwfm", spec, dim=4))["collapse"])
    ['max_rows', 'publication', 'seconds', 'tables']
    """

    def __init__(self, every: int = 1, max_rows: int | None = 2048) -> None:
        if every < 0:
            raise ValueError("every must be >= 0 publications (0: off)")
        self.every = every
        self.max_rows = max_rows
        self.meta: dict[str, Any] = {}
        self.calls = 0

    def update(self, model: CTRModel) -> dict[str, Any]:
        if self.every and self.calls % self.every == 0:
            t0 = time.perf_counter()
            spectra = collapse_report(model, self.max_rows)
            self.meta = {"collapse": {"tables": compact(spectra), "publication": self.calls,
                                      "max_rows": self.max_rows,
                                      "seconds": round(time.perf_counter() - t0, 6)}}
        self.calls += 1
        return self.meta


# --- feature-label mutual information ---------------------------------------------------------


@dataclass(frozen=True)
class MutualInformation:
    field: str
    mi: float  # plug-in estimate, nats
    mi_corrected: float  # minus the Miller-Madow bias, floored at 0
    label_entropy: float  # H(Y), nats: MI / H(Y) is the share of label uncertainty explained
    values: int  # distinct values seen

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "mi": self.mi, "mi_corrected": self.mi_corrected,
                "label_entropy": self.label_entropy, "values": self.values}


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(values: np.ndarray, labels: np.ndarray, name: str = "") -> MutualInformation:
    """I(X; Y) between one field's encoded values and binary (or discrete) labels.

    >>> y = np.array([0, 1] * 50)
    >>> round(mutual_information(y, y).mi, 4) == round(math.log(2), 4)
    True
    """
    x = np.asarray(values).ravel()
    y = np.asarray(labels).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{x.shape[0]} values but {y.shape[0]} labels")
    n = x.size
    if n == 0:
        return MutualInformation(name, 0.0, 0.0, 0.0, 0)
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    nx, ny = int(xi.max()) + 1, int(yi.max()) + 1
    joint = np.bincount(xi * ny + yi, minlength=nx * ny).astype(np.float64)
    hx, hy = _entropy(np.bincount(xi).astype(np.float64)), _entropy(
        np.bincount(yi).astype(np.float64))
    mi = max(hx + hy - _entropy(joint), 0.0)
    bias = (nx - 1) * (ny - 1) / (2.0 * n)
    return MutualInformation(name, mi, max(mi - bias, 0.0), hy, nx)


def field_mutual_information(rows: np.ndarray, labels: np.ndarray,
                             spec: FeatureSpec) -> list[MutualInformation]:
    """Per field of the spec: the MI of its encoded column (rows [N, F]) with the labels."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != spec.num_fields:
        raise ValueError(f"rows must be [N, {spec.num_fields}], got {rows.shape}")
    return [mutual_information(rows[:, i], labels, f.name) for i, f in enumerate(spec.fields)]


# --- interest entanglement --------------------------------------------------------------------


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a_p, b_p) per row p: 0 aligned, 1 orthogonal, 2 opposite."""
    return 1.0 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)


@dataclass(frozen=True)
class PairGap:
    """Contradictory pairs of (positive task, negative task): their distances in each task's
    space. A disentangled model puts them closer in the positive task's space (gap > 0)."""

    positive: str
    negative: str
    pairs: int
    distance_positive: float  # mean distance in the positive task's space
    distance_negative: float  # mean distance in the negative task's space
    gap: float  # mean of (distance_negative - distance_positive) over the pairs
    agree: float  # share of pairs with distance_positive < distance_negative

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EntanglementReport:
    tasks: tuple[str, ...]
    # Per task: mean distance of its positive pairs and of its negative pairs in its own space.
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    contradictory: list[PairGap] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "per_task": self.per_task,
                "contradictory": [g.as_dict() for g in self.contradictory]}


def entanglement_report(user: Mapping[str, torch.Tensor], ad: Mapping[str, torch.Tensor],
                        labels: torch.Tensor | np.ndarray,
                        tasks: Sequence[str]) -> EntanglementReport:
    """`user[t]`, `ad[t]`: [P, D_t] embeddings of each pair's user and ad in task t's space;
    `labels` [P, T] in {0, 1} (a pair not labelled for a task: -1, ignored)."""
    y = torch.as_tensor(np.asarray(labels))
    if y.dim() != 2 or y.shape[1] != len(tasks):
        raise ValueError(f"labels must be [pairs, {len(tasks)}], got {tuple(y.shape)}")
    dist = {t: cosine_distance(user[t], ad[t]) for t in tasks}
    per_task: dict[str, dict[str, float]] = {}
    for i, t in enumerate(tasks):
        pos, neg = y[:, i] == 1, y[:, i] == 0
        per_task[t] = {"positives": int(pos.sum()), "negatives": int(neg.sum()),
                       "distance_positive": _mean(dist[t][pos]),
                       "distance_negative": _mean(dist[t][neg])}
    gaps: list[PairGap] = []
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            if i == j:
                continue
            c = (y[:, i] == 1) & (y[:, j] == 0)
            da, db = dist[a][c], dist[b][c]
            gaps.append(PairGap(a, b, int(c.sum()), _mean(da), _mean(db), _mean(db - da),
                                _mean((da < db).double())))
    return EntanglementReport(tuple(tasks), per_task, gaps)


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


def stem_task_spaces(model: CTRModel, user_idx: torch.Tensor, ad_idx: torch.Tensor,
                     shared_only: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each task's view of a (user, ad) pair in a STEM model: [v ; e_t], the shared embedding
    and the task's own (what task t's gradient trains; `embedding_tables()`: the shared table,
    then one per task). `shared_only`: v for every task (the entangled baseline). `user_idx`,
    `ad_idx`: global bucket indices [P]."""
    tables = model.embedding_tables()
    tasks = model.tasks or ("default",)
    if not tables:
        raise ValueError(f"model {model.name!r} has no embedding table")
    own = tables[1:] if len(tables) == 1 + len(tasks) else []
    users: dict[str, torch.Tensor] = {}
    ads: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k, t in enumerate(tasks):
            u, a = tables[0][user_idx], tables[0][ad_idx]
            if own and not shared_only:
                u, a = torch.cat([u, own[k][user_idx]], 1), torch.cat([a, own[k][ad_idx]], 1)
            users[t], ads[t] = u, a
    return users, ads


# --- rendering --------------------------------------------------------------------------------


def render_table(spectra: Sequence[FieldSpectrum], top: int = 4) -> str:
    """A per-field text table: table, field, rows trained/total, IA, the largest IA those rows
    could have (min(rows, D)), D, the top singular values."""
    tw = max([5, *(len(s.table) for s in spectra)])
    fw = max([5, *(len(s.field) for s in spectra)])
    head = (f"{'table':<{tw}} {'field':<{fw}} {'trained':>16} {'IA':>6} {'max':>4} {'D':>4}  "
            "top sigma")
    lines = [head, "-" * len(head)]
    for s in spectra:
        sv = " ".join(f"{v:.3g}" for v in s.singular_values[:top])
        lines.append(f"{s.table:<{tw}} {s.field:<{fw}} {s.rows_trained:>7}/{s.rows:<8} "
                     f"{s.ia:>6.2f} {s.ia_max:>4} {s.dim:>4}  {sv}")
    return "\n".join(lines)


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")


def render_spectra_svg(spectra: Sequence[FieldSpectrum], title: str = "") -> str:
    """Normalised singular spectra (sigma_k / sigma_1, log scale) per field, one panel per
    table: a collapsed field's curve drops at once, an abundant one stays flat."""
    tables = list(dict.fromkeys(s.table for s in spectra))
    pw, ph, ml, mt, legend = 420, 300, 50, 40, 170
    width = len(tables) * (pw + legend) + 20
    height = ph + mt + 60
    floor = 1e-3
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="18" font-size="14">{_esc(title)}</text>']
    for p, table in enumerate(tables):
        x0 = 10 + p * (pw + legend) + ml
        rows = [s for s in spectra if s.table == table and s.rows_used > 0]
        dim = max((s.dim for s in rows), default=1)
        out.append(f'<text x="{x0}" y="{mt - 8}">{_esc(table)}: sigma_k / sigma_1 (log), '
                   'trained rows L2-normalised</text>')
        out.append(f'<rect x="{x0}" y="{mt}" width="{pw - ml}" height="{ph - 40}" '
                   'fill="none" stroke="#999"/>')

        def px(k: int, v: float, x0: int = x0, dim: int = dim) -> tuple[float, float]:
            fx = x0 + (pw - ml) * (k / max(dim - 1, 1))
            fy = mt + (ph - 40) * (-math.log10(max(v, floor)) / -math.log10(floor))
            return fx, fy

        for e in range(0, int(-math.log10(floor)) + 1):
            _, y = px(0, 10.0 ** -e)
            out.append(f'<text x="{x0 - 40}" y="{y + 4:.1f}">1e-{e}</text>')
        out.append(f'<text x="{x0 + (pw - ml) / 2 - 10}" y="{mt + ph - 20}">k (1..{dim})</text>')
        for i, s in enumerate(rows):
            colour = _COLOURS[i % len(_COLOURS)]
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in
                           (px(k, v) for k, v in enumerate(s.normalized_spectrum())))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                       'stroke-width="1.5"/>')
            out.append(f'<text x="{x0 + pw - ml + 8}" y="{mt + 12 + 13 * i}" fill="{colour}">'
                       f'{_esc(s.field)} IA {s.ia:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
