"""``pip install`` of the wheel and ``pip install -e .`` both leave the
twistd plugin working.  Offline: the wheel is the one the install phase of
tests/run.sh built (``CLOUDFOXY_TEST_WHEELS``; built here from a copy of
the tree with .venv's setuptools when that is unset), each install goes
into a fresh virtualenv that borrows the dependencies (Twisted, treq...)
of the test environment, and pip is told ``--no-index``.
"""

import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def make_venv(path):
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    python = os.path.join(str(path), "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "borrowed-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def copy_of_the_tree(tmp_path):
    """A copy of the checkout (an install never writes into the checkout,
    which another run may be using)."""
    import shutil

    copy = tmp_path / "cloudfoxy-proxy"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".tox",
        "_trial_temp*", ".tests-install.lock"))
    return str(copy)


def the_wheel(tmp_path):
    folder = os.environ.get("CLOUDFOXY_TEST_WHEELS")
    if not folder:
        folder = str(tmp_path / "wheels")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-index", "--no-build-isolation", "-w", folder, copy_of_the_tree(tmp_path)],
                       check=True, timeout=300)
    [wheel] = [n for n in os.listdir(folder) if n.startswith("cloudfoxy_proxy-") and n.endswith(".whl")]
    return os.path.join(folder, wheel)


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_plugin_after_install(tmp_path, editable):
    python = make_venv(tmp_path / "venv")
    cmd = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-index"]
    source = copy_of_the_tree(tmp_path) if editable else None
    cmd += ["--no-build-isolation", "-e", source] if editable else [the_wheel(tmp_path)]
    subprocess.run(cmd, check=True, timeout=300, cwd=str(tmp_path))
    workdir = tmp_path / "elsewhere"  # not the source tree, so only the installed plugin can be found
    workdir.mkdir()
    out = subprocess.run([python, "-c", RUN_TWISTD, "foxyproxy", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=str(workdir))
    assert out.returncode == 0, out.stderr
    assert "--backend" in out.stdout and "--command-timeout" in out.stdout
    where = subprocess.run([python, "-c", "import cloudfoxy_proxy; print(cloudfoxy_proxy.__file__)"],
                           capture_output=True, text=True, cwd=str(workdir)).stdout
    if editable:
        assert where.startswith(os.path.join(source, "src"))
    else:
        assert where.startswith(str(tmp_path / "venv"))


def test_every_package_is_listed_in_setup_cfg():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    listed = set(cfg["options"]["packages"].split())
    src = os.path.join(ROOT, "src")
    found = {os.path.relpath(d, src).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(src, "cloudfoxy_proxy")) if "__init__.py" in files}
    assert found <= listed, f"add to setup.cfg [options] packages: {sorted(found - listed)}"
