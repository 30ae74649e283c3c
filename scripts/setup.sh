#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs the project, then the real SGLang server's
# CPU set (scripts/sglang-cpu-requirements.txt; sglang itself --no-deps). Idempotent: a stamp
# file records the pyproject.toml and the requirements file it was installed from.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 \
           $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null) \
           /usr/bin/python3.12 /usr/local/bin/python3.12 python3; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}

sglang_reqs=scripts/sglang-cpu-requirements.txt
stamp=.venv/.installed
inputs() { cat pyproject.toml "$sglang_reqs"; }
if [ -f "$stamp" ] && inputs | cmp -s - "$stamp"; then
  exit 0
fi
py=$(find_python) || { echo "setup: need Python >= 3.12 (megatron-core 0.19 requires it); none found" >&2; exit 1; }
echo "setup: creating .venv with $py ($("$py" --version))"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -e '.[test,launch]'
# The real SGLang server on CPU (what and why: the header of $sglang_reqs).
t0=$SECONDS
.venv/bin/python -m pip install -q -r "$sglang_reqs"
no_deps=$(sed -n 's/^#no-deps //p' "$sglang_reqs")
[ -z "$no_deps" ] || .venv/bin/python -m pip install -q --no-deps $no_deps
echo "setup: SGLang CPU set installed in $((SECONDS - t0)) s"
inputs > "$stamp"
