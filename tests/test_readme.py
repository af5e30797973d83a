"""README.md's snippets run as written, on a tiny random checkpoint.

Every ```python and ```bash block of README.md runs, with these substitutions and nothing else changed:

- the model id "google/gemma-4-E2B-it" -> a tiny random checkpoint (the full Gemma 4 vocabulary and tokenizer,
  E2B's context of 128K tokens, 3 layers of width 64): README snippets name that model, the test swaps it in;
- "../shared/tokenizer" -> the tests' tokenizer directory (the `gemma4_tokenizer_dir` fixture);
- port 8000 -> a free port (in `gemma4 serve --port 8000` and in the client's base_url);
- a leading `gemma4` -> `python -m gemma4.cli` with this interpreter (the console script is that function).

Bash blocks are split into commands (lines and `&&`). Each command is run, unless a rule of EXEMPT below matches it
(each says why), or it is `gemma4 serve` (run in the background, once, for the Python blocks that talk to
`127.0.0.1:8000`) or `gemma4 demo` (run with SHRINK's arguments added, under the `slow` marker). A new command in
the README therefore runs here unless someone adds a visible exemption for it.

The relative links of the README must lead to files, and to headings that exist there; the flags of its command
table must exist in the `gemma4` parser.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_server_support import TOKENIZER_FILES, tiny_config

from gemma4 import Model
from gemma4.random_init import randomize_

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL_ID = "google/gemma-4-E2B-it"
TOKENIZER = "../shared/tokenizer"
PORT = "8000"

# Commands that do not run here, by prefix, and why. Visible on purpose: a new command runs unless it is listed.
EXEMPT = {
    "pip install": "installs packages: this test runs in the environment already installed",
    "python -m pytest": "the whole suite, this test included",
    "gemma4 bench --preset 26B-A4B": "measures an official size on a GPU for minutes (tests/test_bench.py covers "
                                     "the command on a tiny model)",
}
# `gemma4 demo` builds an official size: here with one layer and four new tokens (still ~20 s on a CPU: slow).
SHRINK = {"gemma4 demo": ["--num-layers", "1", "--max-new-tokens", "4"]}
SERVER_URL = f"http://127.0.0.1:{PORT}"
# Flags of the command table that another change is adding (allowed to be missing from the parser until it lands).
PENDING_FLAGS = {("serve", "--gpu-memory-utilization")}


def blocks(language: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```language block of the README."""
    text = README.read_text()
    return [(text[:m.start(1)].count("\n") + 1, m.group(1))
            for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def commands() -> list[str]:
    return [c.strip() for _, code in blocks("bash") for line in code.splitlines() for c in line.split("&&")
            if c.strip() and not c.strip().startswith("#")]


def exempt(command: str) -> bool:
    return any(command.startswith(prefix) for prefix in EXEMPT)


def substitute(text: str, checkpoint: Path, tokenizer: Path, port: int) -> str:
    return (text.replace(MODEL_ID, str(checkpoint)).replace(TOKENIZER, str(tokenizer))
            .replace(f"--port {PORT}", f"--port {port}").replace(SERVER_URL, f"http://127.0.0.1:{port}"))


def argv(command: str, checkpoint: Path, tokenizer: Path, port: int) -> list[str]:
    args = shlex.split(substitute(command, checkpoint, tokenizer, port))
    return [sys.executable, "-m", "gemma4.cli", *args[1:]] if args[0] == "gemma4" else args


def run_python(line: int, code: str, checkpoint: Path, tokenizer: Path, port: int) -> None:
    """exec the block in a fresh namespace; tracebacks give README.md's own line numbers."""
    source = "\n" * (line - 1) + substitute(code, checkpoint, tokenizer, port)
    exec(compile(source, str(README), "exec"), {"__name__": "readme"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gemma4_tokenizer_dir) -> Path:
    directory = tmp_path_factory.mktemp("readme-model")
    config = tiny_config()
    config.text_config.max_position_embeddings = 131_072  # as E2B's: the README's --max-model-len must fit
    randomize_(Model(config), 0).save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        shutil.copy(gemma4_tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def server(checkpoint, gemma4_tokenizer_dir, tmp_path_factory):
    """The README's `gemma4 serve` command, on the tiny checkpoint and a free port, until /health answers."""
    (serve,) = [c for c in commands() if c.startswith("gemma4 serve ")]
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "log.txt"
    with open(log, "w") as out:
        process = subprocess.Popen(argv(serve, checkpoint, gemma4_tokenizer_dir, port), cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"`{serve}` exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`{serve}` did not answer /health within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_the_readme_has_the_snippets_this_test_runs():
    """The rules above bite on something: a rename in the README cannot silently skip its snippets."""
    assert len(blocks("python")) >= 2 and any(SERVER_URL in code for _, code in blocks("python"))
    names = commands()
    assert sum(c.startswith("gemma4 serve ") for c in names) == 1
    assert any(c.startswith(tuple(SHRINK)) for c in names)
    for prefix in EXEMPT:  # each exemption still matches a command of the README
        assert any(c.startswith(prefix) for c in names), f"EXEMPT rule {prefix!r} matches nothing: remove it"


def test_python_snippets(checkpoint, gemma4_tokenizer_dir, tmp_path, monkeypatch):
    """Every Python block that needs no server, in order, in an empty working directory (for what they write)."""
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line, code in blocks("python"):
        if SERVER_URL not in code:
            run_python(line, code, checkpoint, gemma4_tokenizer_dir, 0)
            ran += 1
    assert ran >= 2


def test_serve_and_the_client_snippet(server, checkpoint, gemma4_tokenizer_dir):
    for line, code in blocks("python"):
        if SERVER_URL in code:
            run_python(line, code, checkpoint, gemma4_tokenizer_dir, server)


def test_bash_commands(checkpoint, gemma4_tokenizer_dir):
    """Every command that is neither exempt, the server (above) nor shrunk (below) runs and exits with 0."""
    for command in commands():
        if exempt(command) or command.startswith("gemma4 serve ") or command.startswith(tuple(SHRINK)):
            continue
        done = subprocess.run(argv(command, checkpoint, gemma4_tokenizer_dir, free_port()), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"`{command}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.mark.slow
def test_shrunk_commands(checkpoint, gemma4_tokenizer_dir, tmp_path):
    for command in commands():
        extra = next((args for prefix, args in SHRINK.items() if command.startswith(prefix)), None)
        if extra is not None:
            done = subprocess.run(argv(command, checkpoint, gemma4_tokenizer_dir, 0) + extra, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "GEMMA4_CACHE": str(tmp_path)})
            assert done.returncode == 0, f"`{command}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            assert "random weights" in done.stdout


# --- links and flags ------------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_lead_to_files_and_headings():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), f"README links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"README links to {link}: no such heading in {path}"


def test_the_command_table_names_real_flags():
    from gemma4.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    rows = re.findall(r"^\| `gemma4 (\w+)([^`]*)` \|", README.read_text(), re.M)
    assert {name for name, _ in rows} >= {"demo", "generate", "chat", "serve", "bench", "init"}
    for name, usage in rows:
        known = {option for action in subparsers[name]._actions for option in action.option_strings}
        for flag in re.findall(r"--[a-z][a-z-]*", usage):
            assert flag in known or (name, flag) in PENDING_FLAGS, f"`gemma4 {name} {flag}` is not a flag"
