"""docker-compose.yml, the Dockerfile and deploy/ checked against what the code really accepts.

No Docker engine or cluster runs here, so without these tests the files would first be checked
by whoever runs them. Every container that runs the ctrloop image is reduced to its `ctrloop`
arguments and its environment (ConfigMaps and Secrets resolved), and then:
- the arguments parse with `ctrloop.cli.build_parser()`;
- every CTRLOOP_* variable is a field of the settings class of the subcommand that reads it
  (pydantic-settings ignores unknown ones silently: a misspelt or renamed setting would just be
  lost), and the settings object builds from that environment plus the flags, as the CLI does;
- ports, probe and healthcheck routes, depends_on, volumes, topics and the Kafka and Redis
  addresses agree with one another and with the code.

`python tests/unit/test_compose.py` prints the settings table of docs/deploy.md.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args
from urllib.parse import urlsplit

import annotated_types
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from ctrloop.cli import build_parser
from ctrloop.io.kafka import create_topics
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.io.settings import ConnectionSettings
from ctrloop.service.app import create_app
from ctrloop.service.settings import ServiceSettings
from ctrloop.trainer.checkpoint import save_checkpoint
from ctrloop.trainer.settings import LearningSettings, TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
PREFIX = "CTRLOOP_"
IMAGE = "ctrloop"

# The settings class each subcommand builds from CTRLOOP_* variables (ctrloop/cli.py). Any
# other subcommand reads none, so a CTRLOOP_* variable set for it is a mistake.
SETTINGS_OF: dict[str, type[BaseSettings]] = {
    "train": TrainerSettings,
    "serve": ServiceSettings,
    "replay": LearningSettings,
}
# What every process must agree on: a topic or address set for one process only would split
# the loop (the service writing where the trainer does not read) without any error.
SHARED_FIELDS = tuple(ConnectionSettings.model_fields)


# ---------------------------------------------------------------------------- loading

def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
KUSTOMIZATION: dict[str, Any] = yaml.safe_load(
    (DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
MANIFEST_FILES = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
MANIFESTS: list[tuple[str, dict[str, Any]]] = [
    (p.name, d) for p in MANIFEST_FILES for d in _load_yaml_docs(p)]


def _objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in MANIFESTS if d.get("kind") == kind}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def _dockerfile() -> list[Instruction]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append(Instruction(keyword.upper(), args.strip()))
    return out


DOCKER = _dockerfile()


def _docker_json(keyword: str) -> list[str]:
    found = [i for i in DOCKER if i.keyword == keyword]
    assert found, f"Dockerfile has no {keyword}"
    value = json.loads(found[-1].args)  # exec (JSON) form: no shell between docker and ctrloop
    assert isinstance(value, list), f"Dockerfile {keyword} must be a JSON list, got {value!r}"
    return value


# ---------------------------------------------------------------------------- containers

@dataclass
class Container:
    """A container that runs the ctrloop image: its `ctrloop` arguments and environment."""

    origin: str
    argv: list[str]
    env: dict[str, str]
    spec: dict[str, Any] = field(default_factory=dict)  # the compose service / k8s container
    problems: list[str] = field(default_factory=list)  # entrypoint overrides, missing refs

    def __str__(self) -> str:
        return self.origin


def _is_ctrloop_image(image: str) -> bool:
    name = image.split("@")[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":")[0] == IMAGE


def _compose_env(svc: dict[str, Any]) -> dict[str, Any]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _compose_containers() -> list[Container]:
    out = []
    for name, svc in SERVICES.items():
        if not ("build" in svc or _is_ctrloop_image(str(svc.get("image", "")))):
            continue
        command = svc.get("command")
        argv = shlex.split(command) if isinstance(command, str) else command
        c = Container(f"docker-compose.yml:{name}", list(argv or _docker_json("CMD")),
                      {k: str(v) for k, v in _compose_env(svc).items()}, svc)
        if "entrypoint" in svc:
            c.problems.append("overrides the image's ENTRYPOINT; run ctrloop subcommands")
        out.append(c)
    return out


def _secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in MANIFESTS:
        spec = doc.get("spec") or {}
        if doc.get("kind") == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            yield f"{doc['kind']}/{doc['metadata']['name']}", spec["template"]["spec"]


def _k8s_containers() -> list[Container]:
    config_maps = {n: d.get("data") or {} for n, d in _objects("ConfigMap").items()}
    secrets = {n: _secret_data(d) for n, d in _objects("Secret").items()}
    sources = {"configMap": config_maps, "secret": secrets}
    out = []
    for workload, pod in _pod_specs():
        for ctr in pod.get("containers", []) + pod.get("initContainers", []):
            if not _is_ctrloop_image(ctr.get("image", "")):
                continue
            c = Container(f"deploy:{workload}/{ctr['name']}",
                          list(ctr.get("args") or _docker_json("CMD")), {}, ctr)
            if "command" in ctr:
                c.problems.append("`command` overrides the image's ENTRYPOINT; use `args`")
            for ref in ctr.get("envFrom", []):
                kind = "configMap" if "configMapRef" in ref else "secret"
                r = ref[f"{kind}Ref"]
                if r["name"] in sources[kind]:
                    c.env.update({ref.get("prefix", "") + k: str(v)
                                  for k, v in sources[kind][r["name"]].items()})
                elif not r.get("optional"):
                    c.problems.append(f"envFrom {kind} {r['name']!r} is not in deploy/")
            for var in ctr.get("env", []):
                if "value" in var:
                    c.env[var["name"]] = str(var["value"])
                    continue
                src = var.get("valueFrom", {})
                kind = "configMap" if "configMapKeyRef" in src else "secret"
                r = src.get(f"{kind}KeyRef")
                if r is None:
                    c.problems.append(f"{var['name']}: only value, configMapKeyRef and "
                                      "secretKeyRef can be checked")
                elif r["key"] in sources[kind].get(r["name"], {}):
                    c.env[var["name"]] = str(sources[kind][r["name"]][r["key"]])
                elif not r.get("optional"):
                    c.problems.append(f"{var['name']}: {kind} {r['name']!r} key {r['key']!r} "
                                      "is not in deploy/")
            out.append(c)
    return out


def _dockerfile_container() -> Container:
    env = {}
    for ins in DOCKER:
        if ins.keyword == "ENV":
            for part in shlex.split(ins.args):
                if "=" in part:
                    k, v = part.split("=", 1)
                    env[k] = v
    return Container("Dockerfile:CMD", _docker_json("CMD"), env)


CONTAINERS = [*_compose_containers(), *_k8s_containers(), _dockerfile_container()]


def _by_origin(origin: str) -> Container:
    found = [c for c in CONTAINERS if c.origin == origin]
    assert found, f"no container {origin!r}; there are {[str(c) for c in CONTAINERS]}"
    return found[0]


def _parse(c: Container) -> Any:
    err = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        return build_parser().parse_args(c.argv)
    pytest.fail(f"{c}: `ctrloop {shlex.join(c.argv)}` is refused by ctrloop's argument "
                f"parser (a renamed or removed subcommand or flag?):\n{err.getvalue()}")


def _ctrloop_vars(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.upper().startswith(PREFIX)}


def _field(var: str) -> str:
    return var[len(PREFIX):].lower()


def settings_of(c: Container, monkeypatch: pytest.MonkeyPatch) -> BaseSettings | None:
    """What the container's process builds: its CTRLOOP_* variables, then its flags on top
    (as ctrloop/cli.py does). None for subcommands that read no settings."""
    args = _parse(c)
    cls = SETTINGS_OF.get(args.command)
    variables = _ctrloop_vars(c.env)
    if cls is None:
        assert not variables, (f"{c}: `ctrloop {args.command}` reads no CTRLOOP_* variable, "
                               f"but {sorted(variables)} are set")
        return None
    unknown = sorted(k for k in variables if _field(k) not in cls.model_fields)
    assert not unknown, (
        f"{c}: {unknown} are not settings of `ctrloop {args.command}` ({cls.__name__}); "
        f"pydantic-settings would ignore them silently. Known: "
        f"{sorted(PREFIX + f.upper() for f in cls.model_fields)}")
    lower = sorted(k for k in variables if k != k.upper())
    assert not lower, f"{c}: write CTRLOOP_* variable names in upper case: {lower}"
    overrides = {f: getattr(args, f) for f in cls.model_fields
                 if getattr(args, f, None) is not None}
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.upper().startswith(PREFIX):
                m.delenv(key)
        for key, value in variables.items():
            m.setenv(key, value)
        try:
            return cls(**overrides)
        except ValidationError as e:
            refused = str(e)
    pytest.fail(f"{c}: `ctrloop {args.command}` would refuse these settings: {refused}")


@pytest.fixture(scope="module")
def route_paths() -> set[str]:
    """The paths of the real FastAPI app (in-memory registry, no Kafka; not started)."""

    class NoKafka:
        def close(self, timeout: float = 2.0) -> None:
            pass

    with pytest.MonkeyPatch.context() as m:
        for key in list(os.environ):
            if key.upper().startswith(PREFIX):
                m.delenv(key)
        app = create_app(ServiceSettings(), registry=InMemoryRegistry(),
                         sink=cast(Any, NoKafka()))
    return {getattr(r, "path", "") for r in app.routes}


# ---------------------------------------------------------------------------- every container

def test_every_role_is_covered() -> None:
    origins = {str(c) for c in CONTAINERS}
    for name in ("trainer", "service", "simulator"):
        assert f"docker-compose.yml:{name}" in origins
    for workload in ("Deployment/ctrloop-service/service", "StatefulSet/ctrloop-trainer/trainer"):
        assert f"deploy:{workload}" in origins


@pytest.mark.parametrize("c", CONTAINERS, ids=str)
def test_container_arguments_parse(c: Container) -> None:
    assert not c.problems, f"{c}: {c.problems}"
    _parse(c)


@pytest.mark.parametrize("c", CONTAINERS, ids=str)
def test_container_settings_are_known_and_valid(c: Container,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings_of(c, monkeypatch)


def test_other_containers_set_no_ctrloop_variables() -> None:
    ctrloop = {str(c) for c in CONTAINERS}
    for name, svc in SERVICES.items():
        if f"docker-compose.yml:{name}" not in ctrloop:
            assert not _ctrloop_vars({k: "" for k in _compose_env(svc)}), name


def test_compose_environment_values_are_strings_or_numbers() -> None:
    # Compose refuses booleans ("true" unquoted) in `environment`.
    for name, svc in SERVICES.items():
        for key, value in _compose_env(svc).items():
            assert not isinstance(value, bool), f"{name}: quote {key}'s value ({value})"
            assert isinstance(value, str | int | float), f"{name}: {key}={value!r}"


def test_processes_agree_on_kafka_redis_and_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    for where, trainer, service in (
            ("docker-compose.yml", "docker-compose.yml:trainer", "docker-compose.yml:service"),
            ("deploy/", "deploy:StatefulSet/ctrloop-trainer/trainer",
             "deploy:Deployment/ctrloop-service/service")):
        t = settings_of(_by_origin(trainer), monkeypatch)
        s = settings_of(_by_origin(service), monkeypatch)
        differ = {f: (getattr(t, f), getattr(s, f)) for f in SHARED_FIELDS
                  if getattr(t, f) != getattr(s, f)}
        assert not differ, f"{where}: trainer and service disagree (trainer, service): {differ}"


# ---------------------------------------------------------------------------- docker compose

def _compose_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    s = settings_of(_by_origin(f"docker-compose.yml:{name}"), monkeypatch)
    assert s is not None
    return s


def _container_port(entry: Any) -> int:
    if isinstance(entry, dict):
        return int(entry["target"])
    return int(str(entry).split("/")[0].rsplit(":", 1)[-1])


def _healthcheck_urls(svc: dict[str, Any]) -> list[str]:
    test = (svc.get("healthcheck") or {}).get("test", [])
    text = test if isinstance(test, str) else " ".join(test)
    return re.findall(r"https?://[^\s'\"]+", text)


def test_compose_service_listens_where_it_is_published_and_probed(
        monkeypatch: pytest.MonkeyPatch, route_paths: set[str]) -> None:
    s = _compose_settings("service", monkeypatch)
    assert s.host in ("0.0.0.0", "::"), (
        f"the service listens on {s.host}: other containers and the published port cannot "
        "reach it; pass --host 0.0.0.0")
    svc = SERVICES["service"]
    ports = [_container_port(p) for p in svc.get("ports", [])]
    assert ports == [s.port], f"published container ports {ports}, the service listens on {s.port}"
    for url in _healthcheck_urls(svc):
        u = urlsplit(url)
        assert u.port == s.port, f"service healthcheck {url}: the service listens on {s.port}"
        assert u.path in route_paths, f"service healthcheck {url}: no such route"
    assert _healthcheck_urls(svc), "the service's healthcheck should probe an HTTP route"


def test_compose_simulator_drives_the_service(monkeypatch: pytest.MonkeyPatch,
                                              route_paths: set[str]) -> None:
    s = _compose_settings("service", monkeypatch)
    args = _parse(_by_origin("docker-compose.yml:simulator"))
    assert args.command == "drive"
    u = urlsplit(args.url)
    assert (u.hostname, u.port) == ("service", s.port), (
        f"the simulator drives {args.url}; the service is service:{s.port}")
    for url in _healthcheck_urls(SERVICES["simulator"]):
        assert urlsplit(url).netloc == u.netloc and urlsplit(url).path in route_paths, url


def test_compose_healthchecks_and_depends_on() -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in SERVICES.items():
        one_shot = str(svc.get("restart", "no")) == "no"
        if not one_shot:
            assert svc.get("healthcheck", {}).get("test"), f"{name}: long-running, no healthcheck"
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, how in deps.items():
            assert dep in SERVICES, f"{name} depends on {dep!r}, which is not a service"
            cond = how.get("condition", "service_started")
            assert cond in conditions, f"{name} -> {dep}: unknown condition {cond!r}"
            if cond == "service_healthy":
                assert SERVICES[dep].get("healthcheck"), f"{name} waits for {dep}'s health"
            if cond == "service_completed_successfully":
                assert str(SERVICES[dep].get("restart", "no")) == "no", (
                    f"{name} waits for {dep} to finish, but {dep} restarts")
    for name in ("trainer", "service"):
        waits = SERVICES[name]["depends_on"]
        assert waits["kafka"]["condition"] == "service_healthy", name
        assert waits["redis"]["condition"] == "service_healthy", name


def _env_list(value: str) -> list[str]:
    return [x.strip() for x in str(value).split(",") if x.strip()]


def test_compose_kafka_is_a_single_kraft_node() -> None:
    kafka = SERVICES["kafka"]
    assert str(kafka["image"]).startswith("apache/kafka:")
    env = {k: str(v) for k, v in _compose_env(kafka).items()}
    assert set(_env_list(env["KAFKA_PROCESS_ROLES"])) == {"broker", "controller"}
    listeners = {u.split("://")[0]: u for u in _env_list(env["KAFKA_LISTENERS"])}
    protocols = dict(x.split(":") for x in _env_list(env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]))
    assert set(listeners) <= set(protocols), "every listener needs a security protocol"
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners
    voters = _env_list(env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
    assert len(voters) == 1, "a single node votes alone"
    node, _, address = voters[0].partition("@")
    assert node == env["KAFKA_NODE_ID"], "the only voter must be this node"
    assert address.rsplit(":", 1)[1] == listeners[controller].rsplit(":", 1)[1]
    assert address.split(":")[0] == "kafka", "the voter is addressed by the service name"
    for key, value in env.items():
        if key.endswith(("REPLICATION_FACTOR", "MIN_ISR", "MIN_INSYNC_REPLICAS")):
            assert value == "1", f"{key}={value}: a single broker has one replica"


def _advertised(svc: dict[str, Any]) -> set[str]:
    env = _compose_env(svc)
    return {u.split("://")[1] for u in _env_list(env["KAFKA_ADVERTISED_LISTENERS"])}


def test_compose_addresses_of_kafka_and_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    advertised = _advertised(SERVICES["kafka"])
    for name in ("trainer", "service"):
        s = _compose_settings(name, monkeypatch)
        assert s.kafka_bootstrap in advertised, (
            f"{name} bootstraps from {s.kafka_bootstrap}; kafka advertises {advertised}")
        u = urlsplit(s.redis_url)
        assert u.hostname in SERVICES and str(SERVICES[u.hostname]["image"]).startswith(
            "redis:"), f"{name}: {s.redis_url} is not the compose file's Redis"
        assert (u.port or 6379) == 6379, f"{name}: {s.redis_url}: redis listens on 6379"


def test_compose_topics_are_the_settings_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    command = " ".join(SERVICES["topics"]["command"])
    names = re.search(r"for t in ([^;]+);", command)
    assert names, f"the topics container's command changed shape: {command}"
    s = _compose_settings("trainer", monkeypatch)
    wanted = {s.topic_impressions, s.topic_clicks, s.topic_conversions, s.topic_dead_letter}
    assert set(names.group(1).split()) == wanted
    partitions = int(re.findall(r"--partitions (\d+)", command)[0])
    assert partitions == inspect.signature(create_topics).parameters["partitions"].default, (
        "the trainer's create_topics() warns when a topic exists with another partition count")
    bootstrap = re.findall(r"--bootstrap-server (\S+)", command)[0]
    assert bootstrap in _advertised(SERVICES["kafka"])


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def test_compose_dollar_signs_are_escaped() -> None:
    # Compose substitutes $NAME from the host's environment before any shell sees it.
    for s in _strings(COMPOSE):
        assert "$" not in s.replace("$$", ""), f"write $$ for a literal $ in: {s}"


def _within(path: Path, mount: str) -> bool:
    return path == Path(mount) or Path(mount) in path.parents


def test_compose_checkpoint_is_on_a_named_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _compose_settings("trainer", monkeypatch).checkpoint_dir
    assert ckpt.is_absolute(), f"CTRLOOP_CHECKPOINT_DIR={ckpt} depends on the working directory"
    volumes = [str(v).split(":") for v in SERVICES["trainer"].get("volumes", [])]
    named = [(src, dst) for src, dst, *_ in volumes if src in (COMPOSE.get("volumes") or {})]
    assert any(_within(ckpt, dst) for _, dst in named), (
        f"the trainer checkpoints to {ckpt}, which is on no named volume ({named}): a "
        "recreated container would start learning from scratch")


# ---------------------------------------------------------------------------- trainer health

def _trainer_health_snippets() -> dict[str, str]:
    out = {"docker-compose.yml": SERVICES["trainer"]["healthcheck"]["test"]}
    ctr = _by_origin("deploy:StatefulSet/ctrloop-trainer/trainer").spec
    for probe in ("startupProbe", "livenessProbe"):
        out[f"deploy {probe}"] = ["CMD", *ctr[probe]["exec"]["command"]]
    snippets = {}
    for where, test in out.items():
        assert test[:3] == ["CMD", "python", "-c"], f"{where}: {test}"
        snippets[where] = test[3]
    return snippets


def _health(snippet: str, cwd: Path, env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(PREFIX)}
    return subprocess.run([sys.executable, "-c", snippet], cwd=cwd, env={**clean, **env},
                          timeout=60).returncode


def test_trainer_healthcheck_tracks_the_real_checkpoint(tmp_path: Path) -> None:
    snippets = _trainer_health_snippets()
    assert len(set(snippets.values())) == 1, f"compose and deploy/ check differently: {snippets}"
    snippet = next(iter(snippets.values()))
    defaults = TrainerSettings.model_fields
    interval = defaults["checkpoint_interval_s"].default
    ckpt = tmp_path / "ckpt"
    env = {"CTRLOOP_CHECKPOINT_DIR": str(ckpt)}
    assert _health(snippet, tmp_path, env) == 0, "no checkpoint yet (waiting for impressions)"
    path = save_checkpoint(ckpt, {"model": 1})  # the trainer's own writer and file name
    assert _health(snippet, tmp_path, env) == 0, "a fresh checkpoint is healthy"
    old = time.time() - 3 * interval
    os.utime(path, (old, old))
    assert _health(snippet, tmp_path, env) == 0, "3 checkpoint intervals old is still healthy"
    stale = time.time() - 30 * interval
    os.utime(path, (stale, stale))
    assert _health(snippet, tmp_path, env) == 1, "a stale checkpoint means a wedged trainer"
    # Its fallbacks are the trainer's defaults (directory relative to the working directory).
    default_dir = tmp_path / defaults["checkpoint_dir"].default
    os.utime(save_checkpoint(default_dir, {"model": 1}), (stale, stale))
    assert _health(snippet, tmp_path, {}) == 1


# ---------------------------------------------------------------------------- Dockerfile

def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_dockerfile_installs_cpu_torch_first_then_the_project() -> None:
    pins = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch==")]
    assert pins, "pyproject.toml no longer pins torch"
    runs = [i.args for i in DOCKER if i.keyword == "RUN"]
    torch_at = [k for k, r in enumerate(runs) if re.search(r"pip install .*torch==", r)]
    project_at = [k for k, r in enumerate(runs) if re.search(r"pip install\s+\.(\s|$)", r)]
    assert torch_at and project_at, f"Dockerfile RUN lines: {runs}"
    torch_run = runs[torch_at[0]]
    assert pins[0] in torch_run.split(), f"Dockerfile installs {torch_run}; pyproject: {pins[0]}"
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run
    assert torch_at[0] < project_at[0], "torch must be installed before the project"


def test_dockerfile_entrypoint_user_and_base() -> None:
    assert _docker_json("ENTRYPOINT") == [IMAGE], "the image's entrypoint is the ctrloop command"
    assert _parse(_dockerfile_container()).command
    user = [i.args for i in DOCKER if i.keyword == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "run as a non-root user"
    uid = int(user[-1].split(":")[0])
    for workload, pod in _pod_specs():
        assert pod["securityContext"]["runAsUser"] == uid, f"{workload}: the image's user is {uid}"
    base = next(i.args for i in DOCKER if i.keyword == "FROM")
    version = re.fullmatch(r"python:(\d+\.\d+)-slim", base)
    assert version, f"base image {base}"
    assert version.group(1) + ".0" in SpecifierSet(_pyproject()["project"]["requires-python"])


def _copied() -> set[str]:
    out = set()
    for ins in DOCKER:
        if ins.keyword in ("COPY", "ADD"):
            parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
            out.update(p.rstrip("/").removeprefix("./") for p in parts[:-1])
    return out


def _packages() -> set[str]:
    """The top-level folders `pip install .` reads: each listed package's folder, through
    package-dir (ctrloop.service lives in service/)."""
    tool = _pyproject()["tool"]["setuptools"]
    mapped = tool.get("package-dir", {})
    out = set()
    for pkg in tool["packages"]:
        top = max((m for m in mapped if pkg == m or pkg.startswith(m + ".")), key=len,
                  default=None)
        folder = (mapped[top] + pkg[len(top):].replace(".", "/") if top
                  else pkg.replace(".", "/"))
        out.add(folder.split("/")[0])
    return out


def test_dockerfile_copies_what_pip_install_needs() -> None:
    needed = {"pyproject.toml", _pyproject()["project"]["readme"], *_packages()}
    assert needed <= _copied(), f"`pip install .` needs {sorted(needed - _copied())} in the image"


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            token, re.escape(token))
    return re.compile(out)


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last matching line wins; a pattern matching a parent folder counts."""
    parts = path.split("/")
    ignored = False
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rx = _glob_regex(line.removeprefix("!").strip("/"))
        if any(rx.fullmatch("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_sources_and_drops_local_state() -> None:
    for copied in sorted(_copied()):
        files = [copied] if (ROOT / copied).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / copied).rglob("*.py")
            if "__pycache__" not in p.parts]
        kept_out = [f for f in files if _dockerignored(f)]
        assert not kept_out, f".dockerignore drops files the Dockerfile copies: {kept_out}"
    for local in (".venv/bin/python", "runs/stack/x.log", "tests/data/events.jsonl",
                  "ctrloop/__pycache__/cli.cpython-311.pyc", ".git/HEAD", "events.jsonl"):
        assert _dockerignored(local), f".dockerignore should drop {local}"


# ---------------------------------------------------------------------------- deploy/

def test_kustomization_lists_every_manifest() -> None:
    resources = KUSTOMIZATION["resources"]
    for name in resources:
        assert (DEPLOY / name).is_file(), f"kustomization.yaml lists a missing {name}"
    for path in MANIFEST_FILES:
        kinds = {d["kind"] for f, d in MANIFESTS if f == path.name}
        # Secrets are created by hand (deploy/secret.yaml says how): no placeholder token
        # reaches a cluster through `kubectl apply -k`.
        assert path.name in resources or kinds == {"Secret"}, f"{path.name} is not applied"
    namespace = KUSTOMIZATION["namespace"]
    assert namespace in _objects("Namespace")
    for name, secret in _objects("Secret").items():
        assert secret["metadata"].get("namespace") == namespace, (
            f"Secret {name} is applied by hand, so it must name the namespace {namespace}")


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _named_port(ctr: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in ctr.get("ports", []) if p.get("name") == port]
    assert found, f"container {ctr['name']} has no port named {port!r}"
    return int(found[0])


def test_service_deployment(monkeypatch: pytest.MonkeyPatch, route_paths: set[str]) -> None:
    c = _by_origin("deploy:Deployment/ctrloop-service/service")
    s = cast(ServiceSettings, settings_of(c, monkeypatch))
    dep = _objects("Deployment")["ctrloop-service"]
    pod = dep["spec"]["template"]
    ctr = c.spec
    assert dep["spec"]["replicas"] >= 2
    assert _labels_match(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert s.host in ("0.0.0.0", "::"), "the service must listen on every interface in a pod"
    assert [p["containerPort"] for p in ctr["ports"]] == [s.port]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = ctr[probe]["httpGet"]
        assert get["path"] == path and path in route_paths, f"{probe}: {get}"
        assert _named_port(ctr, get["port"]) == s.port, f"{probe} probes another port"
    if "startupProbe" in ctr:
        assert ctr["startupProbe"]["httpGet"]["path"] in route_paths
    assert ctr["resources"]["requests"]["cpu"], "the HPA's CPU utilisation needs a request"
    assert ctr["resources"]["limits"]["memory"]
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == s.port
    assert notes["prometheus.io/path"] in route_paths

    svc = _objects("Service")["ctrloop-service"]
    assert _labels_match(svc["spec"]["selector"], pod["metadata"]["labels"])
    assert [_named_port(ctr, p["targetPort"]) for p in svc["spec"]["ports"]] == [s.port]
    pdb = _objects("PodDisruptionBudget")["ctrloop-service"]
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    hpa = _objects("HorizontalPodAutoscaler")["ctrloop-service"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "ctrloop-service")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], (
        "with minReplicas <= minAvailable no node could ever be drained")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_trainer_statefulset(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _by_origin("deploy:StatefulSet/ctrloop-trainer/trainer")
    s = cast(TrainerSettings, settings_of(c, monkeypatch))
    sts = _objects("StatefulSet")["ctrloop-trainer"]
    assert sts["spec"]["replicas"] == 1, "exactly one trainer owns the checkpoint (trainer.yaml)"
    governing = _objects("Service")[sts["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = [m["mountPath"] for m in c.spec["volumeMounts"] if m["name"] in claims]
    assert any(_within(s.checkpoint_dir, m) for m in mounts), (
        f"the trainer checkpoints to {s.checkpoint_dir}, on no persistent volume ({mounts})")
    assert sts["spec"]["template"]["spec"]["securityContext"]["fsGroup"]


def test_pods_get_no_service_link_variables() -> None:
    # Kubernetes adds <SERVICE>_PORT=tcp://... for every Service in the namespace; a Service
    # named "ctrloop" would set CTRLOOP_PORT and the service would refuse to start.
    for workload, pod in _pod_specs():
        assert pod.get("enableServiceLinks") is False, workload


def test_config_values_are_strings() -> None:
    for name, cm in _objects("ConfigMap").items():
        for key, value in (cm.get("data") or {}).items():
            assert isinstance(value, str), f"ConfigMap {name}: quote {key}'s value"


# ---------------------------------------------------------------------------- docs

# Meanings of the fields that have no description in their settings class.
MEANINGS = {
    "topic_impressions": "topic of impressions",
    "topic_clicks": "topic of clicks",
    "topic_conversions": "topic of conversions",
    "topic_dead_letter": "topic of malformed messages, with the reason",
    "evict": "when the joiner is full: emit the oldest impression as a negative, or drop it",
    "model": "architecture: fwfm or lr",
    "batch_size": "minibatch size",
    "sparse_lr": "Adagrad learning rate of embeddings",
    "dense_lr": "Adam learning rate of dense weights",
    "metrics_window": "samples in the sliding-window logloss / AUC / calibration",
    "feature_spec": "feature spec JSON (default: inferred from the first impressions)",
    "seed": "model initialisation seed",
    "group_id": "Kafka consumer group",
    "checkpoint_dir": "where the checkpoint and the inferred feature spec are written",
    "log_interval_s": "wall seconds between progress log lines",
    "port": "listen port",
}
READERS: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("trainer", TrainerSettings), ("service", ServiceSettings))
BOUNDS = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"),
          (annotated_types.Le, "le", "≤"), (annotated_types.Lt, "lt", "<"),
          (annotated_types.MinLen, "min_length", "length ≥"))


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _row(name: str, info: Any) -> tuple[str, str, str]:
    bounds = [f"{sign} {_show(getattr(m, attr))}" for m in info.metadata
              for kind, attr, sign in BOUNDS if isinstance(m, kind)]
    choices = get_args(info.annotation) if "Literal" in str(info.annotation) else ()
    if choices:
        bounds.append(" or ".join(str(x) for x in choices))
    meaning = info.description or MEANINGS.get(name, "")
    return f"`{_show(info.default)}`", ", ".join(bounds), meaning


def settings_table() -> str:
    """docs/deploy.md's table: one row per variable, or per reader where they differ."""
    rows: dict[tuple[str, tuple[str, str, str]], list[str]] = {}
    for reader, cls in READERS:
        for name, info in cls.model_fields.items():
            rows.setdefault((name, _row(name, info)), []).append(reader)
    lines = ["| variable | read by | default | bounds | meaning |", "|---|---|---|---|---|"]
    for (name, (default, bounds, meaning)), readers in sorted(rows.items()):
        lines.append(f"| `{PREFIX}{name.upper()}` | {', '.join(readers)} | {default} | "
                     f"{bounds} | {meaning} |")
    return "\n".join(lines)


def test_every_setting_has_a_meaning() -> None:
    for _, cls in READERS:
        for name, info in cls.model_fields.items():
            assert info.description or name in MEANINGS, f"{cls.__name__}.{name}: no meaning"
    stale = [n for n in MEANINGS if all(cls.model_fields[n].description
                                        for _, cls in READERS if n in cls.model_fields)]
    assert not stale, f"MEANINGS names fields that are gone or now have descriptions: {stale}"


def test_docs_list_every_setting() -> None:
    assert settings_table() in DEPLOY_DOC.read_text(encoding="utf-8"), (
        "docs/deploy.md's settings table is out of date with the settings classes; "
        "regenerate it with `python tests/unit/test_compose.py` and paste it in")


if __name__ == "__main__":
    print(settings_table())
