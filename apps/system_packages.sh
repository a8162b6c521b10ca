#!/usr/bin/env bash
# Debian packages for the OHIF stack and its browser test: Orthanc with its DICOMweb plugin, and
# Chromium with ChromeDriver (never a downloaded browser). Installs what is missing when it can
# (root + apt-get); otherwise says what to install and exits 0: the tests that need them skip.
set -uo pipefail
wanted=()
command -v Orthanc >/dev/null || wanted+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || wanted+=(orthanc-dicomweb)
command -v chromium >/dev/null || wanted+=(chromium)
command -v chromedriver >/dev/null || wanted+=(chromium-driver)
[ ${#wanted[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${wanted[@]}") \
    >/tmp/sdfsmis-apt.log 2>&1 && { echo "installed: ${wanted[*]}"; exit 0; }
  echo "could not install ${wanted[*]} (see /tmp/sdfsmis-apt.log): the OHIF tests will skip"
else
  echo "missing ${wanted[*]}: run 'sudo apt-get install ${wanted[*]}' (the OHIF tests skip without them)"
fi
exit 0
