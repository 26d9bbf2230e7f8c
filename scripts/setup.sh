#!/usr/bin/env bash
# Sets up everything the demo and the tests need, on a fresh Linux machine with Python 3.10+.
#
#   bash scripts/setup.sh            # or: make setup (make demo / make test run it first)
#
# 1. The environment: $VENV if set; else the active virtualenv ($VIRTUAL_ENV); else .venv in
#    the repository, created with $PYTHON (default python3). If that Python already imports
#    torch, the venv is made with --system-site-packages so that torch is kept.
# 2. torch, before anything that depends on it (resolving accelerate or transformers with no
#    torch present pulls a multi-GB CUDA build):
#      - no NVIDIA GPU (`nvidia-smi -L` fails): $TORCH_SPEC (default torch==2.13.0); where no
#        CPU build lies on this machine's disk, set TORCH_INDEX_URL to a wheel index that
#        serves CPU builds. The script refuses to install a CUDA build here.
#      - NVIDIA GPU: $TORCH_SPEC (default "torch>=2.4").
#    TORCH_INDEX_URL, when set, is passed to pip as --index-url for torch only.
# 3. pip install -e ".[dev]" (the package, peft, trl, pytest...).
#
# Idempotent: a stamp in the environment, keyed on a hash of pyproject.toml, makes a second run
# return at once. FORCE=1 redoes steps 2-3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
if [[ -n "${VENV:-}" ]]; then
  VENV_DIR="$VENV"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  VENV_DIR="$VIRTUAL_ENV"
else
  VENV_DIR="$ROOT/.venv"
fi
VPY="$VENV_DIR/bin/python"
STAMP="$VENV_DIR/.arena-callbacks-setup"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

hash_of() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  else shasum -a 256 "$1" | cut -d' ' -f1; fi
}
WANT="$(hash_of pyproject.toml)"

if [[ "${FORCE:-0}" != 1 && -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  say "up to date ($VENV_DIR)"
  exit 0
fi

# ---- 1. the environment ---------------------------------------------------------------
if [[ ! -x "$VPY" ]]; then
  command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.10+ or set PYTHON=/path/to/python3"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$("$PYTHON" --version 2>&1) is too old; Python 3.10+ is needed (set PYTHON=...)"
  venv_args=()
  if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    venv_args+=(--system-site-packages)
    say "$PYTHON already has torch; the venv will see it (--system-site-packages)"
  fi
  say "creating $VENV_DIR with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv ${venv_args[@]+"${venv_args[@]}"} "$VENV_DIR" \
    || die "could not create a venv (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PIP=("$VPY" -m pip)
"${PIP[@]}" --version >/dev/null 2>&1 || die "pip is missing in $VENV_DIR"

# ---- 2. torch first -------------------------------------------------------------------
if "$VPY" -c 'import torch' >/dev/null 2>&1; then
  say "torch $("$VPY" -c 'import torch; print(torch.__version__)') is already installed"
else
  index_args=()
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    index_args=(--index-url "$TORCH_INDEX_URL")
  fi
  if nvidia-smi -L >/dev/null 2>&1; then
    spec="${TORCH_SPEC:-torch>=2.4}"
    say "NVIDIA GPU found; installing $spec"
  else
    spec="${TORCH_SPEC:-torch==2.13.0}"
    say "no NVIDIA GPU; installing a CPU build: $spec"
    # Resolve first, without installing: a CUDA build pulls nvidia-* packages (GBs of downloads).
    if report="$("${PIP[@]}" install --dry-run --quiet --report - ${index_args[@]+"${index_args[@]}"} "$spec" 2>/dev/null)"; then
      cuda="$(printf '%s' "$report" | "$VPY" -c '
import json, sys
names = [i["metadata"]["name"].lower() for i in json.load(sys.stdin).get("install", [])]
print(" ".join(n for n in names if n.startswith("nvidia-") or n == "triton"))
' 2>/dev/null || true)"
      if [[ -n "$cuda" && "${ALLOW_CUDA_TORCH:-0}" != 1 ]]; then
        die "'$spec' resolves to a CUDA build of torch here (it would pull: $cuda).
  This machine has no NVIDIA GPU: point TORCH_INDEX_URL at a wheel index that serves CPU builds
  of torch (see the PyTorch install instructions), or set ALLOW_CUDA_TORCH=1 to install it anyway."
      fi
    fi
  fi
  "${PIP[@]}" install ${index_args[@]+"${index_args[@]}"} "$spec"
fi

# ---- 3. the package and its development tools ------------------------------------------
say "installing arena-callbacks (editable) with its dev extras"
"${PIP[@]}" install -e ".[dev]"

"$VPY" - <<'EOF'
import torch, transformers, arena_callbacks
print(f"setup: ready: torch {torch.__version__} (CUDA {'yes' if torch.cuda.is_available() else 'no'}), "
      f"transformers {transformers.__version__}, arena-callbacks {arena_callbacks.__version__}")
EOF
printf '%s\n' "$WANT" > "$STAMP"
