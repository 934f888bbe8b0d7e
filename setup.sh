#!/usr/bin/env bash
# Install what mae-accelerate needs into the active Python (use a virtual environment or conda env): the
# requirements (a torch >= 2.11 already there, such as a cluster's own CUDA build, is kept), the tests' and plots'
# extras, and, where apt exists, Debian's real Fashion-MNIST (without it the demo reads the 🤗 Hub copy).
set -euo pipefail
cd "$(dirname "$0")"

# A torch (and torchvision) already installed stays as it is: pip may not replace it to satisfy another package.
KEEP="$(mktemp)"
python - "$KEEP" <<'PY'
import sys
from importlib import metadata

with open(sys.argv[1], "w") as out:
    for name in ("torch", "torchvision"):
        try:
            out.write(f"{name}=={metadata.version(name)}\n")
        except metadata.PackageNotFoundError:
            pass
PY
if [ -s "$KEEP" ]; then
  echo "setup: keeping the installed $(tr '\n' ' ' < "$KEEP")"
  python -m pip install -q -r requirements.txt -r requirements-dev.txt -c "$KEEP"
else
  echo "setup: installing torch >= 2.11 and the requirements into $(python -c 'import sys; print(sys.prefix)')"
  python -m pip install -q -r requirements.txt -r requirements-dev.txt
fi
rm -f "$KEEP"

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get > /dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist > /dev/null
fi
if [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: Fashion-MNIST at /usr/share/datasets/fashion-mnist"
else
  echo "setup: no apt here; the demo will read Fashion-MNIST from the Hub (online)"
fi
