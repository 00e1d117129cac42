"""Every shell command README.md and docs/ show runs, at a small size (see documented_commands.py).

A command that breaks (a renamed flag, a recipe key, a moved file) fails here rather than
in a user's shell; so does a document that shows a command no entry covers.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
from documented_commands import CI_COMMANDS, COMMANDS, RUN_ELSEWHERE
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell"}


def _normal(command: str) -> str:
    """One form for a command however it is spaced or quoted: its words, comments dropped,
    re-quoted the same way."""
    return " ".join(shlex.quote(word) if re.search(r"[\s\"'{}]", word) else word
                    for word in shlex.split(command, comments=True))


def shell_commands(text: str) -> list[str]:
    """The commands of a Markdown file's shell blocks: continuation lines joined, comments and
    blank lines dropped, ``a && b`` split."""
    lines, language, inside = [], None, False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside, language = (not inside), line.strip()[3:].strip()
        elif inside and language in SHELL_BLOCKS:
            lines.append(line)
    joined = "\n".join(lines).replace("\\\n", " ")
    return [_normal(part) for line in joined.splitlines() for part in line.split(" && ") if _normal(part)]


DOCUMENTED = {path: shell_commands(path.read_text(encoding="utf-8")) for path in DOCUMENTS}
ENTRIES = {_normal(command): small for command, small in COMMANDS.items()}
ELSEWHERE = {_normal(value) for module in RUN_ELSEWHERE for value in vars(importlib.import_module(module)).values()
             if isinstance(value, str) and value.startswith(("python", "torchrun", "bash"))}


def test_every_documented_command_has_an_entry_and_every_entry_a_document() -> None:
    shown = {command for commands in DOCUMENTED.values() for command in commands}
    missing = sorted(shown - set(ENTRIES) - ELSEWHERE - CI_COMMANDS)
    assert not missing, f"documented commands no test runs (add them to tests/documented_commands.py): {missing}"
    unused = sorted(set(ENTRIES) - shown)
    assert not unused, f"entries of tests/documented_commands.py that no document shows: {unused}"


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "bash .ci/setup" in ci
    readme = (ROOT / "README.md").read_text()
    assert f"`{ci[-1]}`" in readme  # the README names the very command .ci/run ends with
    assert "bash .ci/run" in DOCUMENTED[ROOT / "README.md"]


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory) -> dict[str, str]:
    shared = tmp_path_factory.mktemp("documented")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, base in (("dark", 40), ("light", 180)):
            folder = shared / "images" / split / label
            folder.mkdir(parents=True)
            for index in range(8):
                pixels = np.clip(rng.normal(base, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    Image.fromarray(rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)).save(shared / "photo.png")
    save_file(timm.create_model("deit_small_patch16_224").state_dict(), str(shared / "deit_s.safetensors"))
    return {"imagefolder": str(shared / "images"), "image": str(shared / "photo.png"),
            "deit_s_weights": str(shared / "deit_s.safetensors")}


def small_form(command: str, tmp: Path, placeholders: dict[str, str]) -> str:
    small = ENTRIES[command]
    for old, new in small.replace.items():
        assert old in command, f"replacement {old!r} does not occur in {command!r}"
        command = command.replace(old, new)
    command = f"{command} {small.append}".strip()
    for name, value in {"tmp": str(tmp), **placeholders}.items():
        command = command.replace(f"{{{name}}}", value)
    return command


@pytest.mark.parametrize("document", [path for path in DOCUMENTS if set(DOCUMENTED[path]) - CI_COMMANDS - ELSEWHERE],
                         ids=lambda path: path.name)
def test_documented_commands_run(document: Path, placeholders, tmp_path) -> None:
    """Each of the document's commands, in order, in the repository root, exits 0."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    bin_folder = Path(sys.executable).parent  # python, python3 and torchrun of the interpreter running the tests
    environment["PATH"] = os.pathsep.join([str(bin_folder), environment.get("PATH", "")])
    for command in DOCUMENTED[document]:
        if command in CI_COMMANDS or command in ELSEWHERE:
            continue
        runnable = small_form(command, tmp_path, placeholders)
        done = subprocess.run(["bash", "-c", runnable], cwd=ROOT, env=environment, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command!r} as {runnable!r} exited {done.returncode}:\n{done.stderr[-3000:]}"
