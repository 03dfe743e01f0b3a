# Sourced by scripts/demo and scripts/test: a project virtualenv with riverflow installed.
# Usage: . scripts/bootstrap.sh [extras]   e.g. ". scripts/bootstrap.sh dev"
set -euo pipefail

apt_install() {  # apt_install PACKAGE... : install Debian packages when root, else say what to install
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "riverflow: installing $* (apt-get)" >&2
    if [ ! -f /tmp/.riverflow-apt-updated ]; then
      apt-get update -qq >/dev/null && touch /tmp/.riverflow-apt-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "riverflow: please install: $* (e.g. sudo apt-get install $*)" >&2
    return 1
  fi
}

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$PY" -m venv .venv
  fi
fi
extras=${1:-}
want="."
[ -n "$extras" ] && want=".[$extras]"
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e "$want"
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
