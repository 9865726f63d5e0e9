"""The package installs like a library: a wheel built from this checkout, installed into a fresh
virtual environment and run from a folder outside the checkout, holds every preset and the web
page's template, loads every preset by name and trains on a folder of images."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
PACKAGE = CHECKOUT / "src" / "plmetric"


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of this checkout (setuptools from the test environment: no download)."""
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    source = build / "plmetric"  # a copy, so that the build's egg-info and build/ never touch the checkout
    shutil.copytree(
        CHECKOUT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*cache"),
    )
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*command, "--wheel-dir", str(out), str(source)], cwd=build, env=_clean_env(), timeout=300)
    (found,) = out.glob("plmetric-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh virtual environment holding the wheel; the test environment's packages (torch, ...)
    are visible through a ``.pth`` file, its editable plmetric is not (a ``.pth`` line adds a
    folder to the path without running the ``.pth`` files inside it)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv, env=_clean_env(), timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        cwd=venv, env=_clean_env(), timeout=60).stdout.strip())
    (purelib / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    _run(pip, cwd=venv, env=_clean_env(), timeout=300)
    return venv, _clean_env()


def _clean_env() -> dict[str, str]:
    """The environment without anything that would put this checkout's sources on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}


def test_the_wheel_holds_every_preset_and_the_page_template(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (PACKAGE / "config" / "presets").glob("*.yaml"))
    assert len(presets) >= 7
    missing = [f"plmetric/config/presets/{name}" for name in presets if f"plmetric/config/presets/{name}" not in names]
    assert not missing, missing
    templates = sorted(p.name for p in (PACKAGE / "retrieval" / "templates").iterdir())
    assert templates and all(f"plmetric/retrieval/templates/{t}" in names for t in templates)
    modules = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")}
    assert modules <= names, sorted(modules - names)


@pytest.mark.slow
def test_the_installed_wheel_runs_outside_the_checkout(installed, tmp_path) -> None:
    venv, env = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    python, plmetric = str(venv / "bin" / "python"), str(venv / "bin" / "plmetric")
    assert "train" in _run([plmetric, "--help"], cwd=work, env=env, timeout=120).stdout
    probe = (
        "import json, plmetric, plmetric.config as c; "
        "loaded = {n: c.load_config(n).model.backbone for n in c.preset_names()}; "
        "print(json.dumps({'file': plmetric.__file__, 'presets': loaded}))"
    )
    found = json.loads(_run([python, "-c", probe], cwd=work, env=env, timeout=120).stdout)
    assert Path(found["file"]).resolve().is_relative_to(venv.resolve()), found["file"]  # the wheel, not the checkout
    shipped = {p.stem for p in (PACKAGE / "config" / "presets").glob("*.yaml")}
    assert set(found["presets"]) == shipped


@pytest.mark.slow
def test_the_installed_wheel_trains_on_a_folder_with_its_folder_preset(installed, tmp_path, request) -> None:
    """``plmetric train --images DIR`` from the wheel, without --config: the folder preset is found,
    one short epoch runs on a handful of real photos (the CUB subset's; made-up images without it)."""
    venv, env = installed
    pile = tmp_path / "pile"
    pile.mkdir()
    from shared_data import cub_subset_root

    photos = sorted((cub_subset_root() / "CUB_200_2011" / "images").glob("*/*.jpg"))[:12]
    if photos:
        for photo in photos:
            shutil.copy(photo, pile / photo.name)
    else:
        from image_trees import make_tree

        make_tree("images", pile, classes=3, per_class=4, bad=0)
    run = tmp_path / "run"
    command = [str(venv / "bin" / "plmetric"), "train", "--images", str(pile), "--out", str(run), "--no-progress"]
    small = ["train.epochs=1", "data.image_size=64", "data.num_workers=0", "train.device=cpu"]
    small.append("train.min_steps=6")  # one round of seeds, not the preset's 300 steps: a quick run
    done = _run([*command, *[f"--set={s}" for s in small]], cwd=tmp_path, env=env, timeout=600)
    assert "preset folder for 12 images" in done.stdout, done.stdout
    assert (run / "selected.safetensors").is_file() and (run / "summary.json").is_file()
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
