#!/usr/bin/env bash
# Install what mae-accelerate needs into the active Python (use a virtual environment or conda env): the
# requirements (a torch >= 2.11 already there, such as a cluster's own CUDA build, is kept), the tests' and plots'
# extras, and, where apt exists, Debian's real Fashion-MNIST (without it the demo reads the 🤗 Hub copy).
set -euo pipefail
cd "$(dirname "$0")"

# A torch >= 2.11 already installed (a cluster's own CUDA build, say) stays as it is: it and its torchvision are
# pinned and left out of what pip is asked for, so no other package can make pip replace them.
KEEP="$(mktemp -d)"
python - "$KEEP" <<'PY'
import re
import sys
from importlib import metadata
from pathlib import Path

out, pins = Path(sys.argv[1]), []
try:
    version = metadata.version("torch")
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) >= (2, 11):
        pins.append(f"torch=={version}")
        try:
            pins.append(f"torchvision=={metadata.version('torchvision')}")
        except metadata.PackageNotFoundError:
            pass
    else:
        print(f"setup: torch {version} is older than 2.11, which the code needs: pip installs a newer one")
except metadata.PackageNotFoundError:
    pass
kept = {pin.split("==")[0] for pin in pins}
lines = [line for line in Path("requirements.txt").read_text().splitlines()
         if re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0] not in kept]
(out / "requirements.txt").write_text("\n".join(lines) + "\n")
(out / "constraints.txt").write_text("".join(pin + "\n" for pin in pins))
PY
if [ -s "$KEEP/constraints.txt" ]; then
  echo "setup: keeping the installed $(tr '\n' ' ' < "$KEEP/constraints.txt")"
  python -m pip install -q -r "$KEEP/requirements.txt" -r requirements-dev.txt -c "$KEEP/constraints.txt"
else
  echo "setup: installing torch >= 2.11 and the requirements into $(python -c 'import sys; print(sys.prefix)')"
  python -m pip install -q -r requirements.txt -r requirements-dev.txt
fi
rm -rf "$KEEP"

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
