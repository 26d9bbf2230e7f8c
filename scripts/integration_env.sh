#!/usr/bin/env bash
# Builds the environment of one training tool that pins its own transformers/TRL versions, so the
# monitor is tested inside the tool as its users run it (issue 19: Axolotl, LLaMA-Factory).
#
#   bash scripts/integration_env.sh axolotl      # -> .venvs/axolotl  (make test-integrations)
#
# Each tool has a folder integrations/<tool>/ with:
#   requirements.txt         the tool's own pins and what its code imports, installed after torch
#   requirements-nodeps.txt  (optional) installed with --no-deps --ignore-requires-python: the
#                            tool itself, where its declared requirements cannot install here
#   post_install.py          (optional) run with the environment's python afterwards (stubs)
# then this package, editable, with its own (range) dependencies, and pytest.
#
# torch: $TORCH_SPEC (default torch==2.13.0, the CPU build scripts/setup.sh uses; on a GPU
# machine set TORCH_SPEC). Idempotent: a stamp keyed on the hash of the files above.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOL="${1:?usage: integration_env.sh <tool> (a folder of integrations/)}"
SPEC_DIR="integrations/$TOOL"
[[ -f "$SPEC_DIR/requirements.txt" ]] || { echo "integration_env: no $SPEC_DIR/requirements.txt" >&2; exit 1; }
PYTHON="${PYTHON:-python3}"
VENV_DIR="${INTEGRATION_VENVS:-$ROOT/.venvs}/$TOOL"
VPY="$VENV_DIR/bin/python"
STAMP="$VENV_DIR/.arena-callbacks-integration"

say() { printf 'integration_env[%s]: %s\n' "$TOOL" "$*"; }
WANT="$( { cat pyproject.toml "$0" "$SPEC_DIR"/requirements*.txt "$SPEC_DIR"/post_install.py 2>/dev/null || true; } \
  | sha256sum | cut -d' ' -f1)"  # (cat fails on the optional files that are absent)
if [[ "${FORCE:-0}" != 1 && -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  say "up to date ($VENV_DIR)"
  exit 0
fi
rm -rf "$VENV_DIR"
say "creating $VENV_DIR with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV_DIR"
PIP=("$VPY" -m pip install --quiet --disable-pip-version-check)
say "torch: ${TORCH_SPEC:-torch==2.13.0}"
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
say "the tool's requirements ($SPEC_DIR/requirements.txt)"
"${PIP[@]}" -r "$SPEC_DIR/requirements.txt" "pytest>=8" "pytest-timeout>=2.3"
if [[ -f "$SPEC_DIR/requirements-nodeps.txt" ]]; then
  say "without dependencies ($SPEC_DIR/requirements-nodeps.txt)"
  "${PIP[@]}" --no-deps --ignore-requires-python -r "$SPEC_DIR/requirements-nodeps.txt"
fi
say "arena-callbacks (editable)"
"${PIP[@]}" -e .
if [[ -f "$SPEC_DIR/post_install.py" ]]; then
  say "post_install.py"
  "$VPY" "$SPEC_DIR/post_install.py"
fi
"$VPY" -m pip check >/dev/null 2>&1 || say "note: pip check reports conflicts (expected where a tool is installed without its declared dependencies)"
printf '%s\n' "$WANT" > "$STAMP"
say "ready"
