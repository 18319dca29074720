# Shared set-up steps for scripts/test and scripts/demo. Idempotent; quiet when nothing is missing.

apt_install() {
  if [ "$(id -u)" != "0" ]; then
    echo "missing system packages: $* (install them, or run this as root)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

ensure_python_env() {
  local extra="${1:-}"
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "Python 3.11 or newer is required" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv 2>/dev/null || { apt_install python3-venv && python3 -m venv .venv; }
  fi
  local stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)${extra:+-$extra}"
  if [ ! -f "$stamp" ]; then
    echo "installing Python packages into .venv (log: .venv/install.log)" >&2
    local target="."
    [ -n "$extra" ] && target=".[$extra]"
    if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip \
           && .venv/bin/python -m pip install --disable-pip-version-check -e "$target"; } \
         > .venv/install.log 2>&1; then
      tail -30 .venv/install.log >&2
      echo "pip install failed" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}

ensure_postgres_binaries() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql
  fi
  if [ "$(id -u)" = "0" ] && ! id postgres >/dev/null 2>&1; then
    echo "the postgres system user is missing" >&2
    exit 1
  fi
}

ensure_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  if ! node -e 'process.exit(parseInt(process.versions.node, 10) >= 20 ? 0 : 1)'; then
    echo "Node.js 20 or newer is required by the FHIR test server (found $(node --version))" >&2
    exit 1
  fi
}
