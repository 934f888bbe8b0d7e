#!/usr/bin/env bash
# Install what mae-accelerate needs on a fresh machine: the Python requirements and, where apt exists,
# Debian's real Fashion-MNIST (the demo's and the tests' data; without it the demo reads the 🤗 Hub copy).
set -euo pipefail
cd "$(dirname "$0")"

python -m pip install -q -r requirements.txt

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get > /dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist > /dev/null
fi
if [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: Fashion-MNIST at /usr/share/datasets/fashion-mnist"
else
  echo "setup: no apt here; the demo will read Fashion-MNIST from the Hub (online), the tests need the IDX files"
fi
