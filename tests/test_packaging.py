"""A wheel (non-editable) install, outside the repository, has the built-in model."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from PIL import Image

from .conftest import REPO, needs_builtin

pytestmark = needs_builtin


def test_wheel_install_outside_the_repo_runs_explain_with_the_builtin_model(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("advdetect-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target,
                    str(wheel)], check=True, capture_output=True, timeout=300)
    # the dependencies (torch, ...) come from this environment, after the fresh venv's own packages;
    # the editable install's finder in there is not activated (a plain path line does not run .pth files)
    deps = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(target) / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(image)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ADVDETECT_MODELS")}
    where = subprocess.run([str(python), "-c", "import advdetect, advdetect.models.registry as r; "
                            "print(advdetect.__file__); print(r.models_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    package_file, models = where.stdout.split()
    assert package_file.startswith(target) and models.startswith(target), where.stdout
    result = subprocess.run([str(python), "-m", "advdetect", "explain", str(image), "--model", "cifar10-cnn",
                             "--iterations", "5", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"target"' in result.stdout
