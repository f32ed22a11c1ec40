"""Packaging: `python -m build` makes an sdist and a wheel without warnings; the wheel
installs into a fresh virtualenv (dependencies resolved by pip, no access to this venv's
packages) and gives a working `registry-replicator`; an editable install does too. In
both, `replicator.gc` is our collector while `import gc` is still CPython's.

One test and one venv for both installs: building and installing are the slow parts,
about 15 s in all."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.db",
    "*.db-wal",
    "*.db-shm",
)
IMPORT_CHECK = """
import gc, importlib.resources, json, replicator, replicator.gc
assert gc.collect and gc.__name__ == "gc" and not hasattr(gc, "__file__"), gc  # CPython's
demo = importlib.resources.files("replicator.demo") / "demo.yaml"
print(json.dumps({"replicator": replicator.__file__, "collector": replicator.gc.__file__,
                  "version": replicator.__version__, "demo": demo.is_file()}))
"""


def run(*argv, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def installed(venv: Path, cwd: Path) -> dict:
    import json

    version = run(venv / "bin" / "registry-replicator", "--version", cwd=cwd).stdout.strip()
    info = json.loads(run(venv / "bin" / "python", "-c", IMPORT_CHECK, cwd=cwd).stdout)
    info["cli"] = version
    return info


@pytest.mark.slow
def test_build_then_install_wheel_and_editable(tmp_path):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    src = tmp_path / "src"  # a copy: building writes egg-info/build dirs into the tree
    shutil.copytree(ROOT, src, ignore=SKIP, symlinks=True)
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()

    # sdist, then the wheel built *from the sdist*: proves the sdist is complete
    build = run(sys.executable, "-m", "build", "--outdir", dist, src, cwd=tmp_path)
    noise = [
        line
        for line in (build.stdout + build.stderr).splitlines()
        if re.search(r"[Dd]eprecat|SetuptoolsWarning|^WARNING", line)
    ]
    assert noise == [], "\n".join(noise)
    wheel = dist / f"registry_replicator-{version}-py3-none-any.whl"
    sdist = dist / f"registry_replicator-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    names = zipfile.ZipFile(wheel).namelist()
    assert "replicator/gc/__init__.py" in names and "replicator/gc/storage.py" in names
    assert "replicator/demo/demo.yaml" in names and "replicator/py.typed" in names
    assert not [n for n in names if n.startswith(("gc/", "tests/"))], "stray top-level package"
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(f"registry_replicator-{version}.dist-info/entry_points.txt")
        .decode()
    )
    assert "registry-replicator = replicator.cli:main" in entry_points

    # a fresh venv without this one's packages: pip must resolve every dependency
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=tmp_path)
    run(venv / "bin" / "python", "-m", "pip", "check", cwd=tmp_path)
    info = installed(venv, elsewhere)
    site_packages = venv / "lib"
    assert info["cli"] == f"registry-replicator {version}"
    assert info["version"] == version
    assert Path(info["replicator"]).is_relative_to(site_packages)
    assert Path(info["collector"]) == Path(info["replicator"]).parent / "gc" / "__init__.py"
    assert info["demo"] is True

    # editable: the same venv, now pointing at the source tree (gc/ mapped to replicator.gc)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "-e", src, cwd=tmp_path)
    info = installed(venv, elsewhere)
    assert info["cli"] == f"registry-replicator {version}"
    assert Path(info["replicator"]) == src / "replicator" / "__init__.py"
    assert Path(info["collector"]) == src / "gc" / "__init__.py"
    assert info["demo"] is True


def test_httpcore_is_pinned_to_the_series_whose_private_read_size_we_raise():
    """The transport raises httpcore's undocumented READ_NUM_BYTES; the pin in pyproject
    must hold the installed (tested) version, and the attribute must still take effect."""
    import httpcore
    from packaging.requirements import Requirement

    import replicator.registry.transport  # noqa: F401  (raises the read size on import)

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if Requirement(d).name == "httpcore"]
    assert pin.specifier.contains(httpcore.__version__), (pin, httpcore.__version__)
    assert not pin.specifier.contains("1.1.0"), "pinned beyond the tested 1.0.x series"
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES >= 256 * 1024
