"""Every command the README and docs/ name runs as written: each `python PATH` names a file of the repository and
each `python -m MODULE` an importable module, and every one of them answers --help."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `python x.py`, `python -m x`, `torchrun [flags] x.py`: the script or module after the launcher and its own flags
COMMAND = re.compile(r"(?:\bpython3?|\btorchrun)((?:\s+--?[\w-]+(?:[ =](?!-)[^\s`]+)?)*?)\s+(-m\s+[\w.]+|[\w./-]+\.py)\b")


def commands():
    """{script or '-m module': [documents naming it]}."""
    found = {}
    for doc in DOCS:
        for match in COMMAND.finditer(doc.read_text(encoding="utf-8")):
            found.setdefault(match.group(2).replace("-m ", "-m ", 1), []).append(doc.name)
    return found


def test_the_docs_name_commands():
    found = commands()
    assert "train.py" in found and "eval.py" in found and "-m pytest" in found, sorted(found)


@pytest.mark.parametrize("target", sorted(commands()))
def test_every_command_exists_and_answers_help(target):
    if target.startswith("-m "):
        argv = ["-m", target[3:], "--help"]
    else:
        assert (ROOT / target).is_file(), f"{target} (named in {', '.join(commands()[target])}) does not exist"
        argv = [target, "--help"]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-2000:]
