#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or a used one:
#   1. installs the Debian packages of tests/debian-packages.txt that are
#      missing (needs root; a real pcscd + vsmartcard stack, pyscard's
#      build dependencies, OpenSC ...);
#   2. creates the virtualenv .venv and installs the project with its
#      [pcsc,test] extras into it;
#   3. runs pytest over tests/ (extra arguments go to pytest).
# Exit status: pytest's (non-zero on any failure, 5 if no test ran).
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' tests/debian-packages.txt)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/run.sh: missing Debian packages: ${missing[*]}; run as root or install them" >&2
        exit 2
    fi
    echo "tests/run.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[pcsc,test]'

exec .venv/bin/python -m pytest -p no:cacheprovider -ra tests "$@"
