#!/usr/bin/env bash
# Fetch and cache real labelled scans for development (never committed): Debian's mricron-data
# (Colin27 T1 MRI + AAL atlas, see lib/sdfsmis/evaluation/colin27.py for the licences), prepared
# as data/real/colin27 for `sdfsmis evaluate --protocol propagation --data data/real/colin27`.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SDFSMIS_DATA:-data}"
mkdir -p "$CACHE/cache"
if [ ! -d "$CACHE/cache/mricron/usr/share/mricron/templates" ]; then
  (cd "$CACHE/cache" && apt-get download mricron-data >/dev/null)
  dpkg -x "$CACHE"/cache/mricron-data_*.deb "$CACHE/cache/mricron"
fi
. .venv/bin/activate
python -m sdfsmis.evaluation.colin27 "$CACHE/cache/mricron/usr/share/mricron/templates" "$CACHE/real/colin27"
