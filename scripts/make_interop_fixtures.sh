#!/usr/bin/env bash
# Rebuild tests/fixtures/interop with the peers' own code (SAELens, sparsify, dictionary_learning).
#
# Why a throwaway venv outside the repo: sae-lens pins TransformerLens 3.x, which cannot share saekit's
# venv. torch is installed FIRST and pinned (an unpinned torch pulls a multi-GB CUDA build; this pin takes
# the local CPU wheel); the peers are pinned to versions that resolve with it. torchvision, pulled in by
# nnsight (a dictionary-learning dependency), is removed: its wheel does not match this torch and breaks
# `import transformers`; none of the code used here needs it.
#
#   scripts/make_interop_fixtures.sh            # make the fixtures, then check SAELens reads saekit's files
#   VENV=/tmp/other scripts/make_interop_fixtures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/interop-venv}
OUT=tests/fixtures/interop
SAEKIT_PY=${SAEKIT_PY:-.venv/bin/python}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q torch==2.13.0 sae-lens==6.54.12 eai-sparsify==1.3.3 dictionary-learning==0.1.0
"$VENV/bin/pip" uninstall -y -q torchvision 2>/dev/null || true

rm -rf "$OUT"
"$VENV/bin/python" scripts/make_interop_fixtures.py make "$OUT"

# The other direction: saekit writes SAELens folders for the same SAEs (with saekit's own venv), and
# SAELens (in the throwaway venv) loads them; the result is recorded in $OUT/saelens_roundtrip.json.
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PYTHONPATH=. "$SAEKIT_PY" scripts/interop_roundtrip.py "$OUT" "$TMP"
"$VENV/bin/python" scripts/make_interop_fixtures.py check-roundtrip "$OUT" "$TMP"
du -sh "$OUT"
