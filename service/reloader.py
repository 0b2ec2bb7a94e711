"""Follows the model registry and swaps verified models in, off the request path.

One background thread per service process listens on the registry's pub/sub channel and polls
the `current`/`pinned` pointers every `poll_s` (pub/sub drops notices on reconnect, so polling
is what guarantees progress). The target is the pinned version if an operator set one, else the
current one. A target that fails verification is refused once — counted and logged — and the
model being served keeps serving; the refusal is remembered so the thread does not retry the
same bytes every poll.

A registry that cannot be read (unreachable, or an entry that is malformed: a pointer that is
not a version, a record that is not JSON, a key of the wrong Redis type) is logged and counted
once per distinct problem, not every poll, and the served model keeps serving (the prior on a
cold start); `describe()` and /readyz say what is wrong until it is repaired.

Operators' pin and unpin (`pin`, `unpin`) load and verify the model to serve first and write
the registry last, so a refused model never leaves a pin behind.

Swapping is one reference assignment (`ModelHolder.served`), atomic under the GIL: a request
reads it once and finishes on that model. Without a pin, the served version never decreases.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import torch

from ctrloop.core.errors import RegistryError, SnapshotError
from ctrloop.core.features import FeatureSpec
from ctrloop.io.registry import ModelRegistry, RedisRegistry, RegistryCorrupt, VersionNotFound
from ctrloop.service.scoring import ServedModel, load_verified, prior_model

log = logging.getLogger(__name__)

RECENT_ROWS = 256


@dataclass
class ReloadStats:
    reloads: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_error_at: float | None = None
    last_check_at: float | None = None
    registry_ok: bool = False
    registry_error: str | None = None  # a malformed registry entry, while it lasts
    refused: list[int] = field(default_factory=list)

    def fail(self, reason: str, message: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.last_error, self.last_error_at = message, time.time()


class ModelHolder:
    """The served model and recent request rows (warm-up inputs for the next model)."""

    def __init__(self, prior_ctr: float, expected_spec: FeatureSpec | None = None) -> None:
        self.served: ServedModel = prior_model(prior_ctr)
        self.prior_ctr = prior_ctr
        self.expected_spec = expected_spec
        # Given to every model swapped in: counts predictions replaced for not being finite.
        self.on_nonfinite: Callable[[str, int], None] | None = None
        self._recent: deque[np.ndarray] = deque(maxlen=8)
        self._lock = threading.Lock()

    def remember_rows(self, rows: np.ndarray) -> None:
        self._recent.append(rows[:32])

    def recent_rows(self) -> torch.Tensor | None:
        chunks = list(self._recent)
        if not chunks:
            return None
        return torch.from_numpy(np.concatenate(chunks)[:RECENT_ROWS])

    def swap(self, new: ServedModel, allow_older: bool = False) -> bool:
        with self._lock:
            old = self.served
            if not allow_older and new.number <= old.number and old.status != "pinned":
                return False
            if self.expected_spec is None and new.spec is not None:
                self.expected_spec = new.spec  # the first trained model fixes the spec
            self.served = new
            return True


class Reloader:
    def __init__(self, registry: ModelRegistry, holder: ModelHolder, poll_s: float = 2.0,
                 on_swap: Callable[[ServedModel], None] | None = None,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.holder = holder
        self.poll_s = poll_s
        self.stats = ReloadStats()
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._refused: set[int] = set()
        self._check_lock = threading.Lock()  # the poll thread and admin requests both check
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.pinned: int | None = None
        # The last registry problem and fetch problem reported: each is logged and counted
        # once while it persists (the poll runs every poll_s), again when it changes.
        self._registry_problem: str | None = None
        self._fetch_problem: str | None = None
        self._loop_problem: str | None = None

    # ------------------------------------------------------------------ loop

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._poll_loop, name="reloader", daemon=True)]
        if isinstance(self.registry, RedisRegistry):
            self._threads.append(threading.Thread(target=self._listen_loop,
                                                  name="reloader-pubsub", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)

    def wake(self) -> None:
        self._wake.set()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
                self._loop_problem = None
            except Exception as e:  # never let the thread die: the service would stop following
                if repr(e) != self._loop_problem:  # a traceback per distinct error, not per poll
                    self._loop_problem = repr(e)
                    log.exception("model reload check failed; still serving %s",
                                  self.holder.served.version)
                    self._fail("error", f"reload check failed: {e!r}")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _listen_loop(self) -> None:
        assert isinstance(self.registry, RedisRegistry)
        backoff = 0.5
        while not self._stop.is_set():
            try:
                pubsub = self.registry.r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.registry.channel)
                backoff = 0.5
                self._wake.set()  # notices may have been missed while disconnected
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._wake.set()
                pubsub.close()
            except (redis.RedisError, OSError) as e:
                log.debug("registry pub/sub disconnected (%s); polling covers it", e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    # ------------------------------------------------------------------ one check

    def check(self) -> bool:
        """Bring the served model to the registry's target version; True if it swapped."""
        with self._check_lock:
            return self._check()

    def _check(self) -> bool:
        self.stats.last_check_at = time.time()
        try:
            pinned, pin_problem = _readable(self.registry.pinned)
            current, current_problem = _readable(self.registry.current)
        except RegistryError as e:
            self.stats.registry_ok = False
            self._report_registry(str(e), count=False)  # the error says what failed
            return False
        self.stats.registry_ok = True
        problem = pin_problem or current_problem
        self.stats.registry_error = problem
        self._report_registry(problem)
        if pin_problem is not None or (pinned is None and current_problem is not None):
            return False  # which version to serve is unknown: keep serving what we have
        self.pinned = pinned
        target = pinned if pinned is not None else (current.version if current else None)
        served = self.holder.served
        if target is None or target in self._refused:
            return False
        if target == served.number and (served.status == "pinned") == (pinned is not None):
            return False
        if pinned is None and target < served.number:
            return False  # never backwards without an operator's pin
        return self.load(target, pinned=pinned is not None)

    def _report_registry(self, problem: str | None, count: bool = True) -> None:
        """Log (and count, for a malformed entry) a registry problem when it first appears or
        changes; log once when it is gone."""
        if problem == self._registry_problem:
            return
        served = self.holder.served.version
        if problem is None:
            log.info("registry readable again (serving %s)", served)
        elif count:
            log.error("model registry is damaged, still serving %s: %s", served, problem)
            self._fail("registry", problem)
        else:
            log.warning("%s; still serving %s (retried every %.0f s)", problem, served,
                        self.poll_s)
        self._registry_problem = problem

    def _fail(self, reason: str, message: str) -> None:
        self.stats.fail(reason, message)
        if self._on_failure:
            self._on_failure(reason)

    def load(self, version: int, pinned: bool = False) -> bool:
        served = self.holder.served
        try:
            new = self._prepare(version, pinned)
        except RegistryError as e:
            # Transient (unreachable, trimmed) or damaged: tried again next poll either way,
            # but reported once until it changes.
            message = f"cannot fetch model version {version}: {e}"
            if message != self._fetch_problem:
                self._fetch_problem = message
                log.warning("%s; still serving %s", message, served.version)
                self._fail("registry" if isinstance(e, RegistryCorrupt) else "fetch", message)
            return False
        except SnapshotError as e:
            self._refused.add(version)
            self.stats.refused = sorted(self._refused)[-20:]
            log.error("refused model version %d, still serving %s: %s", version,
                      served.version, e)
            self._fail("invalid", str(e))
            return False
        self._fetch_problem = None
        return self._install(new, allow_older=pinned)

    def _prepare(self, version: int, pinned: bool) -> ServedModel:
        """Fetch and verify `version` (and its pCVR head) without serving it. Raises
        RegistryError (VersionNotFound when it is not kept) or SnapshotError."""
        record = self.registry.record(version)
        if record is None:
            raise VersionNotFound(f"version {version} is not in the registry")
        data = self.registry.fetch(version)
        served = self.holder.served
        new = load_verified(data, record, self.holder.expected_spec,
                            "pinned" if pinned else "trained", self.holder.prior_ctr,
                            served.encoder, self.holder.recent_rows())
        if new.model is not None and new.model.tasks:
            raise SnapshotError(f"version {version}: a multi-task model "
                                f"({new.model.name}) cannot serve pCTR")
        try:
            new = self._with_heads(new, version)
        except SnapshotError as e:
            raise SnapshotError(f"version {version}'s pCVR head: {e}") from None
        if self.holder.on_nonfinite is not None:
            new = dataclasses.replace(new, on_nonfinite=self.holder.on_nonfinite)
        return new

    def _install(self, new: ServedModel, allow_older: bool) -> bool:
        if not self.holder.swap(new, allow_older=allow_older):
            return False
        self.stats.reloads += 1
        log.info("serving model version %s (%s, loaded in %.0f ms)", new.version, new.status,
                 new.load_seconds * 1000)
        if self._on_swap:
            self._on_swap(new)
        return True

    # ------------------------------------------------------------------ operators

    def pin(self, version: int) -> ServedModel:
        """Serve `version` everywhere: verified here first, then pinned in the registry, then
        swapped in. Raises VersionNotFound, RegistryError (unreachable or damaged) or
        SnapshotError; then nothing was written and the served model is unchanged."""
        with self._check_lock:
            new = self._prepare(version, pinned=True)
            self.registry.pin(version)
            self.pinned = version
            self._refused.discard(version)
            self._install(new, allow_older=True)
            return self.holder.served

    def unpin(self) -> ServedModel:
        """Follow the newest published version again: the current version is read and
        verified first, the pin removed last. Raises RegistryError or SnapshotError (the
        current version cannot be served); then the pin is kept."""
        with self._check_lock:
            current = self.registry.current()
            served = self.holder.served
            new = None
            if current is not None and current.version != served.number:
                new = self._prepare(current.version, pinned=False)
            self.registry.unpin()
            self.pinned = None
            if new is None:
                new = dataclasses.replace(served, status="trained") \
                    if served.status == "pinned" else served
            if new is not served:
                self._install(new, allow_older=True)
            return self.holder.served

    def _with_heads(self, new: ServedModel, version: int) -> ServedModel:
        """Attach the pCVR head published with `version`, verified like the model itself;
        a version without one serves pCTR only."""
        if new.spec is None:
            return new
        head = self.registry.head("pcvr")
        try:
            record = head.record(version)
            data = head.fetch(version) if record is not None else None
        except RegistryError as e:
            log.warning("pCVR head of version %d not fetched (%s); serving pCTR only", version, e)
            return new
        if record is None or data is None:
            return new
        cvr = load_verified(data, record, new.spec, new.status, self.holder.prior_ctr)
        return dataclasses.replace(new, cvr=cvr.model, cvr_record=record)

    def describe(self) -> dict[str, Any]:
        s = self.stats
        d = {"reloads": s.reloads, "reload_failures": dict(s.failures),
             "refused_versions": s.refused, "last_error": s.last_error,
             "last_error_at": s.last_error_at, "last_check_at": s.last_check_at,
             "registry_reachable": s.registry_ok, "pinned": self.pinned}
        if s.registry_error is not None:
            d["registry_error"] = s.registry_error
        return d


def _readable(read: Callable[[], Any]) -> tuple[Any, str | None]:
    """(value, None), or (None, the reason) when the entry is malformed; an unreachable
    registry still raises."""
    try:
        return read(), None
    except RegistryCorrupt as e:
        return None, str(e)

