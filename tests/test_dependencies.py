"""The installed dependencies satisfy pyproject.toml, and the test run states their versions.

The lower bounds in pyproject.toml are versions the suite was run with (see the comments there);
this test keeps a run on anything older from passing silently, and prints what it ran with.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
requirements = pytest.importorskip("packaging.requirements")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def declared() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


@pytest.mark.parametrize("line", declared())
def test_installed_version_meets_pyproject(line):
    requirement = requirements.Requirement(line)
    if requirement.marker is not None and not requirement.marker.evaluate():
        pytest.skip(f"{line}: not for this platform")
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        pytest.skip(f"{requirement.name} is not installed")
    print(f"{requirement.name} {installed} (pyproject: {requirement.specifier})")
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} is installed, but pyproject.toml asks for {requirement.specifier}"
    )
