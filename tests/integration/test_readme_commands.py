"""The README's two commands, run as a newcomer types them, from a fresh checkout.

The commands are parsed out of README.md's "Two commands" block, so this test follows the
README: change the README and the test runs the new commands (or breaks, saying why).

"A fresh checkout" is a copy of every file git knows (tracked, or untracked but not ignored)
into an empty directory: no `runs/`, no caches. Installing torch again for every run would take
minutes and the network, so the copy gets a symlink to this checkout's `.venv` and its
`pyproject.toml` is dated before the venv's install stamp (make then sees the venv as up to
date); PYTHONPATH points the venv's editable install at the copy's code. Everything else is
the newcomer's: the working directory, the Makefile, relative default paths (`runs/stack`).

`make stack` runs until Ctrl-C; the README's own `--duration` bounds it here, passed through
the Makefile's ARGS variable, and every other flag keeps its default. This caught a stack that
died within 2 s on a fresh clone (redis-server was given a relative --dir and a cwd).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from ctrloop.core.errors import CtrloopError
from ctrloop.dev.stack import check_binaries

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Long enough for the first trained model on a loaded machine (first served ~37 s after the
# traffic starts on an idle one: the 30 s click window has to close first), bounded.
DURATION_S = 150
TIMEOUT_S = DURATION_S + 120  # start-up, install check, stop


def readme_commands(readme: str) -> list[str]:
    """The commands of the first ```bash block after the "## Two commands" heading."""
    section = readme.split("\n## Two commands", 1)
    assert len(section) == 2, 'README.md has no "## Two commands" section'
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert block is not None, 'no ```bash block in README.md\'s "Two commands"'
    lines = (line.split("#", 1)[0].strip() for line in block.group(1).splitlines())
    return [line for line in lines if line]


def test_the_readme_names_the_two_commands() -> None:
    commands = readme_commands((ROOT / "README.md").read_text())
    assert commands == ["make stack", "make test"], commands


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("needs make and git")
    stamp = ROOT / ".venv" / ".installed"
    if not stamp.exists():
        pytest.skip("needs this checkout's .venv installed by `make` (.venv/.installed)")
    try:
        check_binaries()
    except CtrloopError as e:
        pytest.skip(str(e))
    dest = tmp_path_factory.mktemp("fresh") / "ctrloop"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
        check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a deleted but still tracked file is not in a checkout either
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    before = stamp.stat().st_mtime - 60
    os.utime(dest / "pyproject.toml", (before, before))
    return dest


def _env(checkout: Path) -> dict[str, str]:
    # A newcomer's shell: no CTRLOOP_* settings; the venv's editable install would import this
    # checkout's code, PYTHONPATH makes it the copy's.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CTRLOOP_") and k not in ("PYTHONPATH", "MAKEFLAGS", "MFLAGS")}
    env["PYTHONPATH"] = str(checkout)
    return env


def _readme_command(name: str) -> list[str]:
    commands = readme_commands((ROOT / "README.md").read_text())
    matching = [c for c in commands if shlex.split(c)[:2] == ["make", name]]
    assert len(matching) == 1, f"README.md's Two commands have no `make {name}`: {commands}"
    return shlex.split(matching[0])


def test_make_stack_from_a_fresh_checkout_starts_serves_and_learns(checkout: Path) -> None:
    cmd = [*_readme_command("stack"), f"ARGS=--duration {DURATION_S}"]
    try:
        done = subprocess.run(cmd, cwd=checkout, env=_env(checkout), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{shlex.join(cmd)} did not stop within {TIMEOUT_S} s:\n{e.stdout}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{shlex.join(cmd)} exited {done.returncode}:\n{out}"
    assert "pip install" not in out, f"make re-installed the venv:\n{out}"
    assert "ctrloop stack is up" in out, out
    # The README's promise: the summary in runs/stack/ of the directory it was run from.
    summary = json.loads((checkout / "runs" / "stack" / "stack-summary.json").read_text())
    assert summary["error"] is None and not summary["interrupted"], summary["error"]
    # uvicorn re-raises the SIGTERM it shut down gracefully on, so -15 is a clean stop too.
    clean = (0, -signal.SIGTERM)
    assert all(c in clean for c in summary["exit_codes"].values()), summary["exit_codes"]
    final = summary["final"]
    assert final["requests"] > 0 and final["impressions"] > 0, final
    # Learned something visible: a trained model version was served to the simulated users.
    trained = [m for m in summary["models"] if m["status"] == "trained"]
    assert trained, f"no trained model served within {DURATION_S} s:\n{out}"
    assert final["first_trained_s"] is not None, final
    for name in ("trainer", "service"):
        assert (checkout / "runs" / "stack" / "logs" / f"{name}.log").exists()


def test_make_test_runs_lint_and_every_test() -> None:
    # Not run for real (it would run this test again): make's dry run shows what it does.
    dry = subprocess.run([*_readme_command("test"), "-n", "-o", ".venv/.installed"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=_env(ROOT)).stdout
    assert ".venv/bin/ruff check ." in dry and ".venv/bin/python -m pytest" in dry, dry
