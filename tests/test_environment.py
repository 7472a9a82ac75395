"""pyproject.toml and environment.yml describe the same environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
# The releases the install instructions pin (Makefile) must satisfy the ranges.
PINNED = {"torch": "2.14.1", "torchvision": "0.29.1"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements() -> dict[str, SpecifierSet]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    parsed = [Requirement(r) for r in reqs]
    return {_canonical(r.name): r.specifier for r in parsed}


def environment_requirements() -> dict[str, SpecifierSet]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml should have exactly one pip: section"
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    reqs = {}
    for line in pip_lists[0]:
        if line.startswith("-e"):
            continue  # the package itself
        r = Requirement(line)
        reqs[_canonical(r.name)] = r.specifier
    for line in conda:
        name = re.split(r"[=<>! ]", line, maxsplit=1)[0]
        if name not in {"python", "pip"}:
            reqs[_canonical(name)] = SpecifierSet(line[len(name):].lstrip("="))
    return reqs


def test_same_packages_in_pyproject_and_environment_yml():
    pyproject, environment = pyproject_requirements(), environment_requirements()
    assert set(pyproject) == set(environment), (
        f"only in pyproject.toml: {sorted(set(pyproject) - set(environment))}; "
        f"only in environment.yml: {sorted(set(environment) - set(pyproject))}"
    )


@pytest.mark.parametrize("name", sorted(PINNED))
def test_torch_specs_agree_and_admit_the_pinned_release(name):
    pyproject, environment = pyproject_requirements(), environment_requirements()
    assert str(pyproject[name]) == str(environment[name]), (
        f"{name}: pyproject.toml says {pyproject[name]!s}, environment.yml says {environment[name]!s}"
    )
    assert PINNED[name] in pyproject[name], f"{name} {pyproject[name]} does not admit {PINNED[name]}"


def test_makefile_pins_match_ranges():
    makefile = (REPO / "Makefile").read_text()
    pins = dict(re.findall(r"\b(torch|torchvision)==([0-9][0-9.]*)", makefile))
    assert pins == PINNED, f"Makefile pins {pins}, expected {PINNED}"


def test_environment_yml_installs_the_package():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip


def test_pytest_markers_registered():
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    names = {m.split(":")[0] for m in ini["markers"]}
    assert {"slow", "browser"} <= names
