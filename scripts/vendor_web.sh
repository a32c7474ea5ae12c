#!/usr/bin/env bash
# Refreshes the web app's third-party files (mlxserve/web/vendor/) from npm, at the pinned
# versions below: marked (markdown), DOMPurify (sanitizing its HTML) and uPlot (charts).
# Their built ES modules and licenses are committed, so the app works offline and no page
# ever loads anything from a CDN. Bump a version here, run this, and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."

MARKED=18.3.0
DOMPURIFY=3.5.0
UPLOT=1.6.32

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
npm install --silent --no-audit --no-fund --prefix "$tmp" \
  "marked@$MARKED" "dompurify@$DOMPURIFY" "uplot@$UPLOT"
modules="$tmp/node_modules"
dest=mlxserve/web/vendor
rm -rf "$dest"
mkdir -p "$dest"
cp "$modules/marked/lib/marked.esm.js" "$dest/marked.esm.js"
cp "$modules/marked/LICENSE" "$dest/LICENSE.marked"
cp "$modules/dompurify/dist/purify.es.mjs" "$dest/purify.esm.js"
cp "$modules/dompurify/LICENSE" "$dest/LICENSE.dompurify"
cp "$modules/uplot/dist/uPlot.esm.js" "$dest/uPlot.esm.js"
cp "$modules/uplot/dist/uPlot.min.css" "$dest/uPlot.min.css"
cp "$modules/uplot/LICENSE" "$dest/LICENSE.uplot"
cat > "$dest/VERSIONS" <<VERSIONS
marked $MARKED (MIT)
dompurify $DOMPURIFY (MPL-2.0 OR Apache-2.0)
uplot $UPLOT (MIT)
VERSIONS
echo "vendored into $dest:"
ls -l "$dest"
