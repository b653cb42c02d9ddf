"""contrib/systemd/foxyproxy.service starts with only the secrets the
config names: one LoadCredential= of a directory (every file in it, none
required), and the documented config names its copies."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def test_the_unit_requires_no_particular_secret_file():
    unit = read("contrib", "systemd", "foxyproxy.service")
    loads = re.findall(r"(?m)^LoadCredential(?:Encrypted)?=(.*)$", unit)
    assert loads == ["secret:/etc/foxyproxy/secrets"]
    assert "install -d -m 0700 /etc/foxyproxy/secrets" in unit


def test_the_documented_config_names_the_directorys_copies():
    text = read("docs", "deployment.md")
    paths = set(re.findall(r"/run/credentials/foxyproxy\.service/([^\s\"':]+)", text))
    assert paths and all(p.startswith("secret_") or p == "secret_FILE" for p in paths), paths
