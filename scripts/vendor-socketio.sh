#!/usr/bin/env bash
# Refresh the web console's vendored socket.io browser client from the npm
# registry (the official socket.io-client v4 package, dist/socket.io.min.js):
#   ./scripts/vendor-socketio.sh           the newest 4.x
#   ./scripts/vendor-socketio.sh 4.8.1     one version
# Writes chatd/console/vendor/socket.io.min.js, its LICENSE and VERSION; commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "socket.io-client@$version" >/dev/null && tar xzf ./*.tgz)
dest=chatd/console/vendor
mkdir -p "$dest"
cp "$work/package/dist/socket.io.min.js" "$dest/socket.io.min.js"
cp "$work/package/LICENSE" "$dest/socket.io.LICENSE"
got=$(node -p "require('$work/package/package.json').version" 2>/dev/null \
  || sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' "$work/package/package.json" | head -n1)
printf 'socket.io-client %s (MIT licence, see socket.io.LICENSE), dist/socket.io.min.js from\nthe npm registry, written by ./scripts/vendor-socketio.sh\n' "$got" > "$dest/VERSION"
echo "vendored socket.io-client $got into $dest"
