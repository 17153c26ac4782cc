#!/usr/bin/env bash
# Re-fetch the Swagger UI files that /docs serves (src/api/static/swagger-ui/) from the npm
# registry, at a pinned version, so the vendored copy can be rebuilt and checked byte for byte.
#
# Usage: scripts/vendor-swagger-ui.sh   (needs npm, tar and openssl; run from anywhere)
#
# Swagger UI 5 is required: FastAPI emits OpenAPI 3.1, which Swagger UI 4 cannot render.
# To upgrade: change VERSION and INTEGRITY together (`npm view swagger-ui-dist@X.Y.Z dist.integrity`),
# run this script, update the version in src/api/static/swagger-ui/README.md, and run
# tests/test_docs.py: its browser test is what proves a new bundle still works under /docs'
# Content-Security-Policy.
set -euo pipefail

VERSION="5.35.0"
# The tarball's sha512 as the registry published it: the same bytes every time, or a loud failure.
INTEGRITY="sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ=="

# Only what the page loads, plus the licences that must travel with it. Not the source maps,
# the ES-module and standalone-preset builds, or the sample index.html / swagger-initializer.js
# (its inline-free replacement is src/api/static/swagger-init.js). oauth2-redirect.html/.js are
# left out too: the password flow posts to the token URL and never redirects.
FILES=(
  swagger-ui-bundle.js
  swagger-ui-bundle.js.LICENSE.txt
  swagger-ui.css
  favicon-32x32.png
  LICENSE
  NOTICE
)

DEST="$(cd "$(dirname "$0")/.." && pwd)/src/api/static/swagger-ui"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

tarball="$(cd "$WORK" && npm pack --silent "swagger-ui-dist@${VERSION}")"
actual="sha512-$(openssl dgst -sha512 -binary "$WORK/$tarball" | openssl base64 -A)"
if [[ "$actual" != "$INTEGRITY" ]]; then
  echo "integrity mismatch for swagger-ui-dist@${VERSION}: got $actual" >&2
  exit 1
fi
tar -xzf "$WORK/$tarball" -C "$WORK"

# Start from an empty folder (README.md aside) so a file dropped from FILES does not linger.
mkdir -p "$DEST"
find "$DEST" -type f ! -name README.md -delete
for name in "${FILES[@]}"; do
  install -m 0644 "$WORK/package/$name" "$DEST/$name"
done
echo "vendored swagger-ui-dist@${VERSION} into ${DEST}:"
(cd "$DEST" && sha256sum "${FILES[@]}")
