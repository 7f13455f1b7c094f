"""One virtualenv per peer library under `.bench-venvs/`, installed from PyPI, pinned.

Made with the `python3` on PATH: `uv venv` + `uv pip install --exclude-newer` when
`.tools/bin/uv` is there (`make` puts it there), else `python3 -m venv` + pip. Idempotent:
a venv whose interpreter answers and whose pinned distributions are at their pinned
versions is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.peers.catalog import EXCLUDE_NEWER, Venv

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".bench-venvs"
UV = ROOT / ".tools" / "bin" / "uv"

# Prints {distribution: version or null} for the pins given as JSON in argv[1].
_CHECK = """
import json, sys
from importlib import metadata
found = {}
for name in json.loads(sys.argv[1]):
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        found[name] = None
print(json.dumps(found))
"""


def python(venv: Venv) -> Path:
    return VENVS / venv.name / "bin" / "python"


def pins(venv: Venv) -> dict[str, str]:
    """`name[extra]==1.2` requirements as {normalized name: version}."""
    found: dict[str, str] = {}
    for requirement in venv.requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", requirement)
        if match is None:
            raise ValueError(f"not an exact pin: {requirement}")
        found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[3]
    return found


def up_to_date(venv: Venv) -> bool:
    exe = python(venv)
    if not exe.exists():
        return False
    wanted = pins(venv)
    try:
        out = subprocess.run(
            [str(exe), "-c", _CHECK, json.dumps(list(wanted))],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    found: dict[str, str | None] = json.loads(out)
    return all(found.get(name) == version for name, version in wanted.items())


def ensure(venv: Venv, log: Callable[[str], None]) -> Path:
    """The venv's interpreter, after creating or updating the venv when needed."""
    if up_to_date(venv):
        return python(venv)
    base = shutil.which("python3")
    if base is None:
        raise RuntimeError("no python3 on PATH")
    target = VENVS / venv.name
    if python(venv).exists() and not _answers(python(venv)):
        log(f"{target}: its interpreter no longer runs, making the venv again")
        shutil.rmtree(target)
    VENVS.mkdir(exist_ok=True)
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    if UV.exists():
        log(f"installing {venv.name} with uv: {' '.join(venv.requirements)}")
        if not python(venv).exists():
            _run([str(UV), "venv", "--quiet", "--python", base, str(target)], env)
        _run(
            [
                str(UV),
                "pip",
                "install",
                "--quiet",
                "--python",
                str(python(venv)),
                "--exclude-newer",
                EXCLUDE_NEWER,
                *venv.requirements,
            ],
            env,
        )
    else:
        log(f"installing {venv.name} with pip: {' '.join(venv.requirements)}")
        if not python(venv).exists():
            _run([base, "-m", "venv", str(target)], env)
        _run(
            [
                str(python(venv)),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *venv.requirements,
            ],
            env,
        )
    if not up_to_date(venv):
        raise RuntimeError(f"{target}: the pinned versions are still not installed")
    return python(venv)


def _answers(exe: Path) -> bool:
    try:
        return subprocess.run([str(exe), "-c", "pass"], timeout=60, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
