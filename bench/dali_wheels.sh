#!/usr/bin/env bash
# NVIDIA DALI (--decode dali) for a GPU machine that cannot reach a package index: its wheels (about 270 MB, for the
# Python there) packed here into parts small enough to copy one at a time, then joined and installed there
# (numpy and packaging, which it also needs, are assumed there).
#   bash bench/dali_wheels.sh pack [PYTHON_VERSION]   # here, with internet: .dali/part_* (PYTHON_VERSION default 3.12)
#   bash bench/dali_wheels.sh install                 # there, once every part is in .dali/: installs into .dali/site
#   export PYTHONPATH=$PWD/.dali/site                 # there, before the run that decodes with DALI
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
        nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
        astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 optree nvtx libcst six)
case "${1:-}" in
  pack)
    EXCLUDE="$(git rev-parse --git-path info/exclude)"
    grep -qx "/.dali/" "$EXCLUDE" 2>/dev/null || echo "/.dali/" >> "$EXCLUDE"
    rm -rf .dali && mkdir -p .dali/wheels
    python -m pip download -q --no-deps --only-binary=:all: --python-version "${2:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .dali/wheels "${WHEELS[@]}"
    tar -cf - -C .dali wheels | split -b 48m - .dali/part_
    rm -rf .dali/wheels
    ls -la .dali ;;
  install)
    ls .dali/part_* > /dev/null 2>&1 || { echo "no .dali/part_* here: copy the parts of 'pack' first" >&2; exit 1; }
    mkdir -p .dali/unpacked
    cat .dali/part_* | tar -xf - -C .dali/unpacked
    python -m pip install -q --no-index --no-deps --no-compile --target .dali/site .dali/unpacked/wheels/*.whl
    rm -rf .dali/unpacked
    PYTHONPATH=.dali/site python -c "import nvidia.dali as dali; print('DALI', dali.__version__)" ;;
  *)
    echo "usage: bash bench/dali_wheels.sh pack [PYTHON_VERSION] | install" >&2
    exit 2 ;;
esac
