#!/usr/bin/env bash
# Refresh requirements.lock: every dependency of chatd and of its tests
# (setup.cfg, with the [test] extra), pinned with hashes, for every platform
# chatd supports. The lock tool (uv) lives in a throwaway venv; it is not a
# dependency of chatd.
#   ./scripts/lock.sh                keep the pinned versions, add what setup.cfg gained
#   ./scripts/lock.sh --upgrade      take the newest versions setup.cfg allows
#   ./scripts/lock.sh -P tornado     upgrade one package
# Then run ./scripts/test.sh (it installs from the new lock) and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
"$PY" -m venv "$tool"
"$tool/bin/python" -m pip install -q uv
"$tool/bin/uv" pip compile setup.cfg --extra test --universal --python-version 3.11 \
  --generate-hashes --no-header --quiet --output-file requirements.lock "$@"
sed -i '1i # The tested versions of every dependency of chatd and its tests (setup.cfg + [test]).\n# Written by ./scripts/lock.sh; installed by scripts/run.sh and scripts/test.sh.' requirements.lock
echo "requirements.lock written: $(grep -c '==' requirements.lock) packages pinned"
