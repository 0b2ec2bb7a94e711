"""The `ctrloop` command: the composition root. It alone imports trainer/ (and, later, service/),
lazily per subcommand, reads settings from the environment and flags, and turns errors into
messages that say what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ctrloop import __version__
from ctrloop.core.errors import ConfigError, CtrloopError, RegistryError

DEFAULT_CLICK_WINDOW = 120.0


def _learning_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning (also CTRLOOP_* environment variables)")
    g.add_argument("--feature-spec", type=Path, help="feature spec JSON (default: inferred)")
    g.add_argument("--click-window", type=float, help="click-attribution window, event seconds "
                   f"(default {DEFAULT_CLICK_WINDOW:g})")
    g.add_argument("--allowed-lateness", type=float, help="watermark lag, seconds (default 30)")
    g.add_argument("--publish-interval", type=float,
                   help="event-time seconds between model snapshots (default 1)")
    g.add_argument("--min-learn-samples", type=int, help="learning cadence: learn released "
                   "samples once this many wait (default 1: every tick, exact)")
    g.add_argument("--max-learn-wait", type=float, help="...or once the oldest waited this "
                   "many event seconds (default 60)")
    g.add_argument("--model", help="architecture: fwfm (default), lr, gwpfm, hmoe (multi-"
                   "embedding mixture of experts), dcnv2, ipnn, flatdnn")
    g.add_argument("--model-params", help="the architecture's hyper-parameters as a JSON "
                   "object, e.g. '{\"tables\": [16, 16]}' for hmoe (CTRLOOP_MODEL_PARAMS)")
    g.add_argument("--dim", type=int, help="embedding size (default 16)")
    g.add_argument("--batch-size", type=int, help="minibatch size (default 1024)")
    g.add_argument("--sparse-lr", type=float, help="Adagrad learning rate of embeddings")
    g.add_argument("--dense-lr", type=float, help="Adam learning rate of dense weights")
    g.add_argument("--adagrad-initial", type=float, help="Adagrad's initial accumulator for "
                   "embedding rows (default 1e-6; 0: plain Adagrad)")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                   help="learn positives of the first click window too")
    g.add_argument("--seed", type=int, help="model initialisation seed (default 0)")
    g.add_argument("--delay-policy", help="pCVR conversion-delay policy: variance (default), "
                   "fixed:SECONDS, naive, fnw, oracle (replay with --truth only)")
    g.add_argument("--conversion-types", help="comma-separated conversion types learned as "
                   "tasks of one pCVR model, e.g. signup,purchase (default: one task, every "
                   "conversion counts)")


_LEARNING_KEYS = ("feature_spec", "click_window", "allowed_lateness", "publish_interval",
                  "model", "model_params", "dim", "batch_size", "sparse_lr", "dense_lr",
                  "adagrad_initial", "warmup", "seed", "delay_policy", "conversion_types",
                  "min_learn_samples", "max_learn_wait")


def _overrides(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_simulate(args: argparse.Namespace) -> int:
    from ctrloop.sim import WorldConfig, write_files
    from ctrloop.sim.scenarios import build

    cfg: dict[str, Any] = {"seed": args.seed, "conversion_mix": args.conversion_mix}
    if args.rate is not None:
        cfg["impressions_per_second"] = args.rate
    if args.scenario is not None:
        seed = cfg.pop("seed")
        world = build(args.scenario, seed, **cfg)
    else:
        world = WorldConfig(**cfg)
    summary = write_files(world, args.impressions, args.events_out, args.truth_out)
    if args.scenario is not None:
        summary["scenario"] = args.scenario
    print(f"wrote {summary['impressions']:,} impressions and {summary['clicks']:,} clicks to "
          f"{args.events_out}, truth to {args.truth_out}", file=sys.stderr)
    _print_json(summary)
    return 0


def _snapshot_writer(path: Path | None) -> Callable[[Any], None] | None:
    """Replay's end, writing the pCTR model as the trainer would publish it (posterior and IA
    per field included), so a replayed model can be analysed or served from a file."""
    if path is None:
        return None

    from ctrloop.trainer.pipeline import CountingPublisher, Pipeline

    def write(pipe: Pipeline) -> None:
        pipe.ctr.collapse.every = 1  # computed now, for this one snapshot
        pipe.ctr.watch_collapse()
        # Replay counts its versions (CountingPublisher); the file is the one after the last.
        counted = pipe.publisher.version if isinstance(pipe.publisher, CountingPublisher) else 0
        path.write_bytes(pipe.ctr.snapshot(counted + 1, {"source": "replay"}))

    return write


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def cmd_replay(args: argparse.Namespace) -> int:
    from ctrloop.core.features import FeatureSpec
    from ctrloop.trainer.replay import outputs_for, print_progress, replay
    from ctrloop.trainer.settings import LearningSettings

    if args.plot_out is not None and args.truth is None:
        raise ConfigError("--plot-out plots the predictions against the truth: pass --truth")
    settings = LearningSettings(**_overrides(args, _LEARNING_KEYS))
    outputs = outputs_for(args.predictions_out, args.rejects_out, args.spec_out)
    spec = FeatureSpec.load(settings.feature_spec) if settings.feature_spec else None
    print(f"replaying {args.events} ...", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        progress: Callable[[dict[str, Any]], None] = print_progress  # lines: logs, pipes
        every = 200_000
        if _is_terminal(sys.stderr) and args.events.exists():
            from ctrloop.trainer.replay import ProgressBar

            bar = stack.enter_context(ProgressBar(args.events, sys.stderr))
            progress, every = bar, bar.every
        summary = replay(args.events, outputs, spec, settings.pipeline_config(), settings.seed,
                         progress=progress, progress_every=every, truth=args.truth,
                         on_finish=_snapshot_writer(args.snapshot_out))
    if summary["spec_inferred"]:
        print(f"feature spec inferred from the first impressions, saved to "
              f"{outputs.spec} (edit it and pass --feature-spec to reuse)", file=sys.stderr)
    if args.truth is not None:
        from ctrloop.core.evaluate import evaluate

        summary["evaluation"] = evaluate(args.predictions_out, args.truth,
                                         settings.click_window)
    if args.summary_out is not None:
        args.summary_out.write_text(json.dumps(summary, indent=2, default=str))
    _print_json(summary)
    m = summary["metrics"]
    print(f"\n{summary['pipeline']['events']:,} events in {summary['seconds']:.1f} s "
          f"({summary['events_per_s']:,.0f} events/s); progressive logloss {m['logloss']:.4f}, "
          f"AUC {m['auc']:.4f}, calibration {m['calibration']:.3f}; {summary['rejected']} "
          f"rejected lines (see {outputs.rejects})", file=sys.stderr)
    if "evaluation" in summary:
        ev = summary["evaluation"]["after_skip"]
        print(f"served predictions after the first 20%: AUC {ev['auc']:.4f} (oracle "
              f"{ev['oracle_auc']:.4f}), logloss {ev['logloss']:.4f} (oracle "
              f"{ev['oracle_logloss']:.4f}), calibration {ev['calibration']:.3f}",
              file=sys.stderr)
    if args.plot_out is not None:
        from ctrloop.trainer.replay import write_replay_plots

        paths = write_replay_plots(args.predictions_out, args.truth, args.plot_out,
                                   settings.click_window)
        print("plots:\n" + "\n".join(f"  {p}" for p in paths), file=sys.stderr)
    return 0


def cmd_ope(args: argparse.Namespace) -> int:
    from ctrloop.core.offpolicy import evaluate_file, render

    result = evaluate_file(args.events, args.target, args.target_file, args.max_weight,
                           args.click_window, args.confidence)
    out = result.as_dict()
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(out, indent=2))
    _print_json(out)
    print(render(result), file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ctrloop.trainer.settings import TrainerSettings
    from ctrloop.trainer.streaming import run_trainer

    keys = (*_LEARNING_KEYS, "kafka_bootstrap", "redis_url", "group_id", "checkpoint_dir",
            "checkpoint_interval_s", "max_events", "stop_when_idle_s")
    settings = TrainerSettings(**_overrides(args, keys))
    summary = run_trainer(settings, args.summary_out)
    _print_json(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ctrloop.dev.demo import run_demo

    out = run_demo(args.workdir, args.impressions, args.stream_events, args.seed)
    (args.workdir / "demo.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"done: outputs and demo.json in {args.workdir}/", file=sys.stderr)
    return 0


_SERVE_KEYS = ("host", "port", "workers", "kafka_bootstrap", "redis_url", "max_candidates",
               "admin_token", "feature_spec", "prior_ctr", "reload_poll_s")


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import uvicorn

    from ctrloop.service.settings import ServiceSettings

    # Validate here (a bad setting fails with a message before any worker starts), then hand
    # the values to the workers through the environment, where each worker's app reads them.
    settings = ServiceSettings(**_overrides(args, _SERVE_KEYS))
    if args.admin_token is not None:
        # Every user of the machine can read a command line (`ps`, /proc/PID/cmdline).
        print("ctrloop: warning: --admin-token is visible to every user of this machine in "
              "the process list; set CTRLOOP_ADMIN_TOKEN in the environment instead",
              file=sys.stderr)
    for key in _SERVE_KEYS:
        value = getattr(settings, key)
        if value is not None:
            os.environ[f"CTRLOOP_{key.upper()}"] = str(value)
    if settings.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Each worker writes its metrics to files here; /metrics sums them (service/metrics.py).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ctrloop-metrics-")
    print(f"serving on http://{settings.host}:{settings.port} ({settings.workers} worker(s)); "
          f"API docs at http://{settings.host}:{settings.port}/docs", file=sys.stderr)
    uvicorn.run("ctrloop.service.app:app_from_env", factory=True, host=settings.host,
                port=settings.port,
                workers=settings.workers, log_level="warning", access_log=False,
                loop=args.loop, http=args.http, timeout_graceful_shutdown=10)
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    import asyncio

    from ctrloop.sim.live import DriverConfig, LiveDriver, run_with_reports, stop_on_signals

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    try:
        config = DriverConfig(rate=args.rate, seed=args.seed, explore=args.explore,
                              conversion_mix=args.conversion_mix)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise ConfigError("--duration must be a finite number of seconds > 0")
    if not (math.isfinite(args.interval) and args.interval > 0):
        raise ConfigError("--interval must be a finite number of seconds > 0")
    # Before any traffic: a service that is not there is one clear error now, not a run of
    # connection errors that ends with exit code 0.
    _check_service(args.url)
    driver = LiveDriver(args.url, config)

    async def report(snap: dict[str, Any], rates: dict[str, float]) -> None:
        print(_drive_line(snap, rates, args.json), flush=True)

    async def drive() -> None:
        with stop_on_signals(driver.request_stop):
            await run_with_reports(driver, args.duration, args.interval, report)

    asyncio.run(drive())
    final = {**driver.snapshot(), "served_auc": driver.stats.served_auc(),
             "timeline": driver.stats.timeline()}
    if args.json:
        print(json.dumps({"final": final}, default=str), flush=True)
    else:
        _print_json(final)
    errors = final["score_errors"]
    if final["requests"] == 0 and errors:
        # Nothing was served: a run that achieved nothing must not look like a success.
        raise CtrloopError(f"no request to {args.url}/v1/score succeeded (errors: "
                           f"{dict(errors)}); {_START_A_SERVICE}")
    return 0


_START_A_SERVICE = ("start one with `ctrloop serve` (or the whole system with `ctrloop stack`), "
                    "or pass --url of a running service")


def _check_service(url: str, timeout_s: float = 5.0) -> None:
    """Raise CtrloopError, saying what to do, if nothing answers HTTP at `url`."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/healthz", timeout=timeout_s)
    except httpx.HTTPError as e:
        # Any HTTP answer (even an error status) proves something listens: the run's own
        # error counts then say what is wrong. Only "nothing answers" stops us here.
        raise CtrloopError(f"the service at {url} is unreachable ({type(e).__name__}: {e}); "
                           f"{_START_A_SERVICE}") from e


def _drive_line(snap: dict[str, Any], rates: dict[str, float], as_json: bool) -> str:
    if as_json:
        return json.dumps({**snap, "interval": rates}, default=str)
    return (f"[{snap['elapsed_s']:6.0f}s] req/s {rates['requests_per_s']:5.1f}  events/s "
            f"{rates['events_per_s']:4.1f}  impressions {snap['impressions']:,}  clicks sent "
            f"{snap['clicks_sent']:,}  pending {snap['pending_events']}  p50/p99 "
            f"{snap['latency_p50_ms']:.1f}/{snap['latency_p99_ms']:.1f} ms  expected CTR "
            f"{snap['expected_ctr']:.4f} (oracle {snap['oracle_ctr']:.4f})  errors "
            f"{sum(snap['score_errors'].values())}  retries {snap['event_retries']}")


def cmd_stack(args: argparse.Namespace) -> int:
    from ctrloop.dev.stack import StackConfig, run_stack

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    # `kill -USR1 <pid>` prints where every thread is: for a stack that does not stop.
    # Only where stderr is a real file (not under pytest's capture, for one).
    with contextlib.suppress(ValueError, OSError, AttributeError):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr.fileno(), all_threads=True)
    config = StackConfig(workdir=args.workdir, port=args.port, workers=args.workers,
                         rate=args.rate, duration=args.duration, seed=args.seed,
                         simulator=args.simulator, click_window=args.click_window,
                         explore=args.explore, conversion_mix=args.conversion_mix)
    run_stack(config)
    return 0


def cmd_delay_report(args: argparse.Namespace) -> int:
    from ctrloop.core.delay_report import render_report

    if (args.checkpoint_dir is None) == (args.redis_url is None):
        raise CtrloopError("delay-report reads one source: --checkpoint-dir (the trainer's "
                           "checkpoint) or --redis-url (the latest published pCVR record)")
    if args.checkpoint_dir is not None:
        from ctrloop.core.delay_report import report_from_pipeline_state
        from ctrloop.trainer.checkpoint import load_checkpoint

        state = load_checkpoint(args.checkpoint_dir)
        if state is None:
            raise CtrloopError(f"no checkpoint in {args.checkpoint_dir}")
        report = report_from_pipeline_state(state["pipeline"], args.top, args.conversion_type)
    else:
        from ctrloop.io.registry import RedisRegistry

        try:
            record = RedisRegistry.from_url(args.redis_url,
                                            args.namespace).head("pcvr").current()
        except RegistryError as e:
            raise RegistryError(f"{e} (--redis-url {args.redis_url}); start the trainer's "
                                "Redis (`ctrloop stack` runs one) or pass the --redis-url of a "
                                "running one, or read --checkpoint-dir instead") from e
        if record is None:
            raise CtrloopError(f"no pCVR model published under {args.namespace!r} yet")
        report = record.meta.get("delays")
        if args.conversion_type is not None:
            by_type = record.meta.get("delays_by_type") or {}
            if args.conversion_type not in by_type:
                raise CtrloopError(f"pCVR version {record.version} has no report of conversion "
                                   f"type {args.conversion_type!r}; it has "
                                   f"{', '.join(by_type) or 'one task for every type'}")
            report = by_type[args.conversion_type]
        if report is None:
            raise CtrloopError(f"pCVR version {record.version} carries no delay report "
                               "(published by a trainer from before the report existed)")
        # The trainer fixed the top N when it published; a smaller --top only shows fewer.
        report = {**report, "advertisers": report["advertisers"][:args.top],
                  "version": record.version}
    if args.json:
        _print_json(report)
    else:
        print(render_report(report))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Collapse analysis of a model (ctrloop/core/analysis.py): per field and embedding table
    (and, with several tables, all of them side by side: table "all"), the trained rows, IA
    and top singular values; an SVG of the normalised spectra; with --events, the
    feature-label mutual information per field and, for a multi-task (STEM) model, the
    interest-entanglement report."""
    from ctrloop.core.analysis import collapse_report, render_spectra_svg, render_table

    model, accumulators, source = _analyzed_model(args)
    spectra = collapse_report(model, args.max_rows, accumulators=accumulators, all_tables=True)
    if not spectra:
        raise CtrloopError(f"{source}: model {model.name!r} has no embedding table to analyse")
    out: dict[str, Any] = {"source": source, "model": model.name, "hparams": model.hparams,
                           "fields": [s.as_dict() for s in spectra]}
    if args.events is not None:
        out.update(_events_report(args.events, model, args.mi_sample))
    args.plot.write_text(render_spectra_svg(spectra, f"{source}: {model.name}"))
    if args.json:
        _print_json(out)
    else:
        print(f"{source}: {model.name} {json.dumps(model.hparams)}")
        print(render_table(spectra))
        for m in out.get("mutual_information", []):
            print(f"MI {m['field']:<24} {m['mi_corrected']:.5f} nats (plug-in {m['mi']:.5f}, "
                  f"{m['values']} values, H(label) {m['label_entropy']:.4f})")
        if "entanglement" in out:
            _print_entanglement(out["entanglement"])
    print(f"spectra plotted to {args.plot}", file=sys.stderr)
    return 0


def _analyzed_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, a checkpoint's accumulators or None, a name for the source) from exactly one of
    --snapshot (registry), --snapshot-file, --checkpoint."""
    from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot

    sources = [x for x in (args.snapshot, args.snapshot_file, args.checkpoint) if x is not None]
    if len(sources) != 1:
        raise CtrloopError("analyze reads one model: --snapshot VERSION|current (from the "
                           "registry at --redis-url), --snapshot-file PATH, or --checkpoint DIR")
    if args.checkpoint is not None:
        return _checkpoint_model(args)
    if args.snapshot_file is not None:
        try:
            data = args.snapshot_file.read_bytes()
        except OSError as e:
            raise CtrloopError(f"cannot read {args.snapshot_file}: {e}") from None
        source = str(args.snapshot_file)
    else:
        data, source = _registry_snapshot(args)
    return build_from_snapshot(decode_snapshot(data), inference=True), None, source


def _registry_snapshot(args: argparse.Namespace) -> tuple[bytes, str]:
    import os

    from ctrloop.io.registry import RedisRegistry

    url = args.redis_url or os.environ.get("CTRLOOP_REDIS_URL")
    if url is None:
        raise CtrloopError("--snapshot reads the registry: pass --redis-url (or set "
                           "CTRLOOP_REDIS_URL)")
    try:
        registry = RedisRegistry.from_url(url, args.namespace)
        if args.head != "pctr":
            registry = registry.head(args.head)  # type: ignore[assignment]
        if args.snapshot == "current":
            record = registry.current()
            if record is None:
                raise CtrloopError(f"no {args.head} model published under {args.namespace!r}")
            version = record.version
        else:
            try:
                version = int(args.snapshot)
            except ValueError:
                raise CtrloopError(f"--snapshot takes a version number or 'current', not "
                                   f"{args.snapshot!r}") from None
        return registry.fetch(version), f"{args.head} version {version}"
    except RegistryError as e:
        raise RegistryError(f"{e} (--redis-url {url})") from e


def _checkpoint_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from ctrloop.core.features import FeatureSpec
    from ctrloop.core.models import build_model
    from ctrloop.trainer.checkpoint import load_checkpoint

    state = load_checkpoint(args.checkpoint)
    if state is None:
        raise CtrloopError(f"no checkpoint in {args.checkpoint}")
    pipeline = state["pipeline"]
    learner = pipeline.get("learner" if args.head == "pctr" else "cvr_learner")
    if learner is None:
        raise CtrloopError(f"the checkpoint in {args.checkpoint} has no {args.head} learner")
    try:
        hparams = json.loads(args.hparams)
    except ValueError as e:
        raise CtrloopError(f"--hparams is not JSON: {e}") from None
    name = args.model
    if args.head == "pcvr" and pipeline.get("cvr_types"):
        name, hparams = "stem", {**hparams, "tasks": list(pipeline["cvr_types"])}
    model = build_model(name, FeatureSpec.from_dict(state["spec"]), **hparams)
    try:
        model.load_state_dict(learner["model"])
    except RuntimeError as e:
        raise CtrloopError(f"the checkpoint's {args.head} weights do not fit model {name!r} "
                           f"{json.dumps(hparams)}: pass the trainer's --model and --hparams "
                           f"(e.g. '{{\"dim\": 16}}'); {str(e)[:300]}") from None
    return model.eval(), learner.get("accumulators"), f"checkpoint {args.checkpoint} {args.head}"


def _events_report(path: Path, model: Any, limit: int) -> dict[str, Any]:
    """Over the first `limit` impressions of an events file: the feature-label mutual
    information per field (label: clicked anywhere in the file) and, for a multi-task model
    (STEM), the interest-entanglement report over those impressions that were clicked, each
    task labelled by whether the click converted with that conversion type; beside it the
    same report in the shared space only (the entangled baseline: gap 0)."""
    import numpy as np
    import torch

    from ctrloop.core.analysis import (
        entanglement_report,
        field_mutual_information,
        stem_task_spaces,
    )
    from ctrloop.core.events import Click, Conversion, Impression
    from ctrloop.core.features import FeatureEncoder
    from ctrloop.trainer.replay import read_events

    spec = model.spec
    encoder = FeatureEncoder(spec)
    ids: list[str] = []
    rows: list[list[int]] = []
    clicked: set[str] = set()
    converted: dict[str, set[str]] = {t: set() for t in model.tasks}
    for e in read_events(path):
        if isinstance(e, Impression):
            if len(rows) < limit:
                ids.append(e.impression_id)
                rows.append(encoder.encode(e))
        elif isinstance(e, Click):
            clicked.add(e.impression_id)
        elif isinstance(e, Conversion) and e.conversion_type in converted:
            converted[e.conversion_type].add(e.impression_id)
    if not rows:
        raise CtrloopError(f"{path} has no impression to analyse")
    x = np.asarray(rows, dtype=np.int64)
    labels = np.fromiter((i in clicked for i in ids), dtype=np.int64, count=len(ids))
    out: dict[str, Any] = {"impressions": len(ids), "mutual_information": [
        m.as_dict() for m in field_mutual_information(x, labels, spec)]}
    if model.tasks and {"user.id", "ad.id"} <= set(spec.names):
        pairs = labels.nonzero()[0]
        u, a = (torch.from_numpy(x[pairs, spec.names.index(f)]) for f in ("user.id", "ad.id"))
        y = torch.tensor([[int(ids[p] in converted[t]) for t in model.tasks] for p in pairs],
                         dtype=torch.int64).reshape(-1, len(model.tasks))
        out["entanglement"] = {
            "pairs": len(pairs),
            "task_spaces": entanglement_report(*stem_task_spaces(model, u, a), y,
                                               model.tasks).as_dict(),
            "shared_space": entanglement_report(*stem_task_spaces(model, u, a, True), y,
                                                model.tasks).as_dict()}
    return out


def _print_entanglement(report: dict[str, Any]) -> None:
    print(f"\ninterest entanglement over {report['pairs']} clicked (user, ad) pairs: cosine "
          "distance in each task's space [v; e_t] (shared space: v)")
    print(f"{'positive':<12} {'negative':<12} {'pairs':>6} {'d+':>7} {'d-':>7} {'gap':>7} "
          f"{'agree':>6} {'shared gap':>10}")
    shared = {(g["positive"], g["negative"]): g for g in report["shared_space"]["contradictory"]}
    for g in report["task_spaces"]["contradictory"]:
        s = shared[(g["positive"], g["negative"])]
        print(f"{g['positive']:<12} {g['negative']:<12} {g['pairs']:>6} "
              f"{g['distance_positive']:>7.4f} {g['distance_negative']:>7.4f} {g['gap']:>7.4f} "
              f"{g['agree']:>6.2f} {s['gap']:>10.4f}")


def _conversion_mix_flag(p: argparse.ArgumentParser) -> None:
    # numpy only (no torch), so --help stays quick; the choices follow the preset table.
    from ctrloop.sim.world import CONVERSION_MIXES

    p.add_argument("--conversion-mix", choices=list(CONVERSION_MIXES), default="single",
                   help="the simulated world's conversion types: single (one 'default' type, "
                        "the default) or funnel ('signup': ~10%% of clicks, minutes, streamed; "
                        "'purchase': ~2%%, hours to days, reported as the advertiser reports)")


def _scenario_flag(p: argparse.ArgumentParser) -> None:
    # numpy only, like the conversion mixes: the names and lines come from the registry.
    from ctrloop.sim.scenarios import describe, names

    listing = "; ".join(f"{n}: {describe(n)}" for n in names())
    p.add_argument("--scenario", choices=names(), metavar="NAME",
                   help="a named world of the scenario suite (docs/scenarios.md) at its "
                        "benchmark scale (--rate overrides its rate; --seed picks the draw). "
                        + listing.replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrloop",
        description="Online-learning CTR service for ads: simulate traffic, replay it through "
                    "the trainer, or train from Kafka.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"ctrloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write a simulated events file and its truth file")
    p.add_argument("--impressions", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, help="impressions per event-time second (default 300)")
    p.add_argument("--events-out", type=Path, default=Path("events.jsonl"))
    p.add_argument("--truth-out", type=Path, default=Path("truth.jsonl"))
    _conversion_mix_flag(p)
    _scenario_flag(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="simulate, replay and stream through local Kafka + Redis")
    p.add_argument("--impressions", type=int, default=300_000)
    p.add_argument("--stream-events", type=int, default=150_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("replay", help="run the joiner and trainer over an events file")
    p.add_argument("--events", type=Path, required=True, help="JSON Lines events file")
    p.add_argument("--predictions-out", type=Path, required=True,
                   help="one {impression_id, pctr, model_version} per impression")
    p.add_argument("--rejects-out", type=Path, help="default <predictions-out>.rejects.jsonl")
    p.add_argument("--spec-out", type=Path, help="default <predictions-out>.spec.json")
    p.add_argument("--truth", type=Path, help="simulator truth file: also score predictions")
    p.add_argument("--summary-out", type=Path, help="write the summary JSON here")
    p.add_argument("--snapshot-out", type=Path,
                   help="write the final pCTR model as a snapshot file (for `ctrloop analyze "
                        "--snapshot-file`)")
    p.add_argument("--plot-out", type=Path,
                   help="with --truth: write SVG plots of the served predictions here "
                        "(calibration, AUC and mean pCTR over event time)")
    _learning_flags(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("ope", help="off-policy evaluation (IPS, SNIPS) of a target policy "
                                   "over logged impressions and clicks")
    p.add_argument("--events", type=Path, required=True,
                   help="JSON Lines events (impressions with position and propensity, clicks)")
    p.add_argument("--target", choices=["logging", "uniform"], default="logging",
                   help="logging: the policy that wrote the log (sanity check); uniform: "
                        "random over the candidates (needs n_candidates on impressions)")
    p.add_argument("--target-file", type=Path,
                   help='JSON Lines {"impression_id", "target_propensity"}: any other policy')
    p.add_argument("--max-weight", type=float, help="clip importance weights at this value")
    p.add_argument("--click-window", type=float,
                   help="count only clicks this many seconds after the impression (default all)")
    p.add_argument("--confidence", type=float, default=0.95, help="CI level (default 0.95)")
    p.add_argument("--json-out", type=Path, help="also write the JSON result here")
    p.set_defaults(func=cmd_ope)

    p = sub.add_parser("train", help="train from Kafka, publish snapshots to Redis")
    p.add_argument("--kafka-bootstrap", help="host:port (CTRLOOP_KAFKA_BOOTSTRAP)")
    p.add_argument("--redis-url", help="redis://host:port/db (CTRLOOP_REDIS_URL)")
    p.add_argument("--group-id", help="Kafka consumer group (default ctrloop-trainer)")
    p.add_argument("--checkpoint-dir", type=Path, help="default runs/trainer")
    p.add_argument("--checkpoint-interval-s", type=float, help="wall seconds (default 10)")
    p.add_argument("--max-events", type=int, help="stop after this many messages")
    p.add_argument("--stop-when-idle-s", type=float, help="stop after this long caught up")
    p.add_argument("--summary-out", type=Path, help="write the final summary JSON here")
    _learning_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="run the scoring service (FastAPI + uvicorn)")
    p.add_argument("--host", help="listen address (default 127.0.0.1; CTRLOOP_HOST)")
    p.add_argument("--port", type=int, help="default 8000 (CTRLOOP_PORT)")
    p.add_argument("--workers", type=int, help="processes, one per core (CTRLOOP_WORKERS)")
    p.add_argument("--kafka-bootstrap", help="host:port (CTRLOOP_KAFKA_BOOTSTRAP)")
    p.add_argument("--redis-url", help="model registry (CTRLOOP_REDIS_URL)")
    p.add_argument("--max-candidates", type=int, help="per request (default 500)")
    p.add_argument("--admin-token", help="enables /v1/admin/*; prefer the CTRLOOP_ADMIN_TOKEN "
                   "environment variable: a flag shows in `ps`")
    p.add_argument("--feature-spec", type=Path, help="serve only snapshots with this spec")
    p.add_argument("--prior-ctr", type=float, help="cold-start pCTR (default 0.03)")
    p.add_argument("--reload-poll-s", type=float, help="registry polling period (default 2)")
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="event loop (auto: uvloop when installed)")
    p.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                   help="HTTP parser (auto: httptools when installed)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("drive", help="send simulated users' traffic to a running service")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the scoring service")
    p.add_argument("--rate", type=float, default=40.0, help="requests per second (default 40)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="simulated world seed")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between stats lines")
    p.add_argument("--json", action="store_true", help="stats as JSON lines")
    p.add_argument("--no-explore", dest="explore", action="store_false",
                   help="rank by the posterior mean (default: ask for Thompson sampling)")
    _conversion_mix_flag(p)
    p.set_defaults(func=cmd_drive)

    p = sub.add_parser("stack", help="Kafka + Redis + trainer + service + simulated users, "
                                     "all local; Ctrl-C stops everything")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--rate", type=float, default=40.0, help="simulated requests/s (default 40)")
    p.add_argument("--port", type=int, help="service port (default 8000, or a free one if "
                                            "8000 is taken; 0: any free port)")
    p.add_argument("--workers", type=int, default=1, help="service worker processes")
    p.add_argument("--workdir", type=Path, default=Path("runs/stack"),
                   help="logs, trainer checkpoint, stack-summary.json (default runs/stack)")
    p.add_argument("--seed", type=int, default=0, help="simulated world seed")
    p.add_argument("--click-window", type=float, default=30.0,
                   help="the trainer's click window, s (default 30: first model ~35 s in)")
    p.add_argument("--no-simulator", dest="simulator", action="store_false",
                   help="start the stack without simulated traffic")
    p.add_argument("--no-explore", dest="explore", action="store_false",
                   help="simulated requests rank by the posterior mean (default: Thompson "
                        "sampling)")
    _conversion_mix_flag(p)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("delay-report",
                       help="per advertiser: conversion-delay wait, variance statistic, "
                            "observed vs history CVR, pCVR calibration")
    p.add_argument("--checkpoint-dir", type=Path, help="read the trainer's checkpoint here")
    p.add_argument("--redis-url", help="or read the latest pCVR record from this registry")
    p.add_argument("--namespace", default="ctrloop", help="registry namespace (default ctrloop)")
    p.add_argument("--top", type=int, default=20,
                   help="advertisers by recent clicks shown; the rest pooled (default 20)")
    p.add_argument("--conversion-type", help="with a pCVR learned per conversion type: this "
                   "type's report (default the first type's)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_delay_report)

    p = sub.add_parser("analyze",
                       help="dimensional collapse of a model: per field and embedding table, "
                            "the singular spectrum and Information Abundance; feature-label MI")
    src = p.add_argument_group("the model (one of)")
    src.add_argument("--snapshot", metavar="VERSION", help="a published version (or 'current') "
                     "from the registry at --redis-url")
    src.add_argument("--snapshot-file", type=Path, help="a snapshot blob on disk")
    src.add_argument("--checkpoint", type=Path, metavar="DIR",
                     help="the trainer's checkpoint directory (exact trained rows from the "
                          "optimizer state)")
    p.add_argument("--redis-url", help="model registry (default CTRLOOP_REDIS_URL)")
    p.add_argument("--namespace", default="ctrloop", help="registry namespace (default ctrloop)")
    p.add_argument("--head", choices=["pctr", "pcvr"], default="pctr",
                   help="which model of the version (default pctr)")
    p.add_argument("--model", default="fwfm",
                   help="with --checkpoint: the trainer's architecture (default fwfm)")
    p.add_argument("--hparams", default="{}",
                   help="with --checkpoint: its hyper-parameters as JSON, e.g. '{\"dim\": 16}'")
    p.add_argument("--max-rows", type=int, help="subsample fields with more trained rows than "
                   "this (default: every trained row)")
    p.add_argument("--plot", type=Path, default=Path("spectra.svg"),
                   help="SVG of the normalised singular spectra (default spectra.svg)")
    p.add_argument("--events", type=Path, help="also, over impressions of this events file: "
                   "feature-label mutual information per field (label: clicked), and for a "
                   "multi-task pCVR model the interest entanglement of its clicked pairs "
                   "(labels: converted, per conversion type)")
    p.add_argument("--mi-sample", type=int, default=200_000,
                   help="impressions read from --events (default 200000, the first ones)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except CtrloopError as e:
        print(f"ctrloop: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # pydantic's ValidationError: bad settings from flags or env
        print(f"ctrloop: invalid settings:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
