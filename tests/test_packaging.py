"""`pip wheel .` ships the passes as graphopt.passes, and a clean install lists them."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)], check=True)
    [built] = out.glob("graphopt-*.whl")
    return built


def test_the_wheel_ships_passes_as_a_subpackage_not_a_top_level_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "graphopt/passes/simplify.py" in names
    assert not [n for n in names if n.startswith("passes/")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[graphopt.passes]" in text and "simplify = graphopt.passes.simplify:Simplify" in text


def test_a_clean_venv_with_the_wheel_lists_the_passes(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib, str(wheel)], check=True)
    # Third-party dependencies come from this environment; graphopt itself only from the wheel.
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = "import graphopt.passes.simplify as s; print(s.__file__)"
    located = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert located.startswith(purelib)
    listing = subprocess.run([str(python), "-m", "graphopt", "list"], capture_output=True, text=True, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "simplify  [all #1]" in listing.stdout
