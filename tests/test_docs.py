"""The documentation tells the truth: the README's tour runs on a fresh copy of the repository,
the generated config reference is current, and docs/openapi.yaml describes real answers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, eventually

# Every ```sh block in these files carries a marker in the HTML comment just above it:
#   <!-- tour: background NAME -->   started in the background (a later one with the same NAME
#                                    replaces it), ready once it prints "listening on"
#   <!-- tour: expect REGEX -->      run (again, until its output matches REGEX)
#   <!-- not run: REASON -->         shown only, with the reason it cannot run as a test
DOCS = ("README.md", "docs/operations.md", "docs/deploying.md", "docs/performance.md",
        "docs/api.md")
_BLOCK = re.compile(r"(?:<!--\s*(tour|not run):\s*(.*?)\s*-->\n)?```(?:sh|bash|shell)\n(.*?)```",
                    re.DOTALL)


@dataclass
class Block:
    kind: str        # "tour", "not run" or "" (no marker)
    marker: str
    command: str


def blocks(name: str) -> list[Block]:
    text = (ROOT / name).read_text()
    return [Block(kind, marker, command) for kind, marker, command in _BLOCK.findall(text)]


@pytest.mark.parametrize("name", DOCS)
def test_every_shell_block_is_run_or_says_why_not(name: str) -> None:
    """Each example command in the docs is either run by a test or marked with why it cannot."""
    if not (ROOT / name).exists():
        pytest.fail(f"{name} is missing")
    for block in blocks(name):
        assert block.kind, f"{name}: a shell block has no marker:\n{block.command}"
        assert block.kind != "not run" or len(block.marker) > 10, f"{name}: say why not"
        assert block.kind != "tour" or name == "README.md", f"{name}: only the README has a tour"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fresh_copy(dest: Path) -> Path:
    """The repository's files (tracked and new, not ignored), as a clone would have them,
    with nothing beside it; ``.venv`` links to the venv running the tests."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in listed.splitlines():
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


class Tour:
    """Runs the README's blocks in order in ``workdir``; the relay's and the sink's ports are
    swapped for free ones (8080 and 9000 may be taken on a shared machine), nothing else."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {"8080": str(_free_port()), "9000": str(_free_port())}
        self.background: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        example = workdir / "config.example.yaml"
        example.write_text(self.swap(example.read_text()))

    def swap(self, text: str) -> str:
        for old, new in self.ports.items():
            text = re.sub(rf"(?<=[:\s\[,]){old}\b", new, text)
        return text

    def start(self, name: str, command: str) -> None:
        self.stop(name)
        log = self.workdir / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            proc = subprocess.Popen(["bash", "-c", "exec " + self.swap(command).strip()],
                                    cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT)
        self.background[name], self.logs[name] = proc, log

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited:\n{log.read_text()}")
            return "listening on" in log.read_bytes()[offset:].decode(errors="replace")

        eventually(listening, what=f"{name} to say it listens", timeout=30)

    def run(self, command: str, expect: str) -> str:
        def attempt() -> str:
            done = subprocess.run(["bash", "-c", self.swap(command)], cwd=self.workdir,
                                  capture_output=True, text=True, timeout=60)
            return done.stdout + done.stderr

        expect = self.swap(expect)
        return eventually(attempt, lambda out: re.search(expect, out, re.MULTILINE),
                          what=f"output of {command!r} to match {expect!r}", timeout=150,
                          interval=0.5)

    def stop(self, name: str) -> None:
        proc = self.background.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    running = Tour(fresh_copy(tmp_path / "clone"))
    try:
        yield running
    finally:
        for name in ("relay", "sink"):
            running.stop(name)


@pytest.mark.slow
def test_readme_tour_runs_top_to_bottom(tour: Tour) -> None:
    """On a fresh copy with nothing beside it, the README's tour shows what it promises: a retry,
    a suspended host, a dead letter, a replay that delivers, in that order."""
    assert not (tour.workdir.parent / "shared").exists()
    steps = [b for b in blocks("README.md") if b.kind == "tour"]
    assert steps, "the README has no tour"
    outputs = []
    for block in steps:
        verb, _, arg = block.marker.partition(" ")
        if verb == "background":
            tour.start(arg, block.command)
        else:
            assert verb == "expect", block.marker
            outputs.append(tour.run(block.command, arg))
    sink_log = tour.logs["sink"].read_text()
    assert "=> answered 200" in sink_log      # the replayed deliveries reached the last sink
    assert "Traceback" not in sink_log + tour.logs["relay"].read_text()


def test_sink_port_taken_is_one_line(tmp_path: Path) -> None:
    """`relay sink` on a taken port exits 1 with one line naming the port and what to do."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "relay", "sink", "--port", str(port)],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and f"port {port}" in done.stderr
    assert "--port" in done.stderr and "listening" not in done.stdout


def test_config_reference_is_current() -> None:
    """docs/configuration.md is exactly what `relay config-reference` prints (regenerate it with
    `.venv/bin/relay config-reference > docs/configuration.md`)."""
    done = subprocess.run([sys.executable, "-m", "relay", "config-reference"],
                          capture_output=True, text=True, check=True, env=os.environ)
    assert (ROOT / "docs" / "configuration.md").read_text() == done.stdout, \
        "docs/configuration.md is stale: .venv/bin/relay config-reference > docs/configuration.md"


def test_config_reference_names_every_key() -> None:
    """Every field of every config model appears in the reference with its meaning."""
    from relay.config.load import _MODELS
    text = (ROOT / "docs" / "configuration.md").read_text()
    for model, _ in _MODELS:
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"`{field.alias or name}`" in text or f".{field.alias or name}`" in text, name


def test_config_reference_names_the_kinds_of_a_union() -> None:
    """A key that takes one of several typed mappings (auth, a template body) is shown with
    the values of its `type`, not as "mapping or mapping"; no type cell repeats itself."""
    from relay.config.reference import reference

    rows = [line.removeprefix("| ").split(" | ")[:2] for line in reference().splitlines()
            if line.startswith("| `")]
    assert ["`body`", "mapping by `type`: `json` or `raw`"] in rows
    assert ["`auth`", "mapping by `type`: `none`, `bearer`, `basic`, `jwt`, `hmac` or "
                      "`oauth2`"] in rows
    assert not [row for row in rows if re.search(r"\b(\w+) or \1\b", row[1])]
