"""The Dockerfile of the server, checked without a container builder (none runs here; see docs/docker.md): its
entrypoint is the package's console script and subcommand, its default command parses as `gemma4 serve`
arguments reachable from outside the container, and what it copies exists and is not ignored."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

from gemma4.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def instructions(name: str) -> list[str]:
    """The arguments of every `name` instruction of the Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def test_the_entrypoint_is_gemma4_serve():
    (entrypoint,) = instructions("ENTRYPOINT")
    command, subcommand = json.loads(entrypoint)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[command] == "gemma4.cli:main"
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert subcommand == "serve" and subcommand in subparsers


def test_the_default_command_serves_on_all_interfaces_on_the_exposed_port():
    (cmd,) = instructions("CMD")
    (exposed,) = instructions("EXPOSE")
    args = build_parser().parse_args(["serve", *json.loads(cmd)])
    assert args.host == "0.0.0.0" and str(args.port) == exposed.strip()
    assert args.model


def test_copied_paths_exist_and_are_not_ignored():
    """.dockerignore excludes everything (`*`) and lets back the paths the build needs (`!path`)."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for rule in rules:  # the last matching rule wins, as Docker reads the file
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                verdict = not rule.startswith("!")
        return verdict

    copies = [arg.split()[:-1] for arg in instructions("COPY")]
    sources = [source for group in copies for source in group]
    assert {"pyproject.toml", "src"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f".dockerignore leaves {source} out of the build context"
    # the package's sources get in; what pip installs them with reads the README too (pyproject's readme)
    assert not ignored("src/gemma4/cli.py") and "README.md" in sources
