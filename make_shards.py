"""Turn an image folder into webdataset-style tar shards plus the shards.json index the training scripts read (or
index shards written elsewhere); they can live on any fsspec URL (``--path_to_data s3://bucket/imagenet-shards``).

    python make_shards.py --input_dir /data/imagenet --output_dir /data/imagenet-shards    # train/ and val/ kept apart
    python make_shards.py --input_dir photos/ --output_dir s3://bucket/photos-shards --samples_per_shard 5000
    python make_shards.py --index_only s3://bucket/existing-webdataset/train                 # shards made by others

Images are copied byte for byte, in a shuffled order (``--seed``) so that every shard mixes the classes, as
``<key>.<ext>`` with the class index in ``<key>.cls``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import posixpath
import random
import tarfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from pipeline.shards import INDEX_NAME, filesystem
from pipeline.sources import ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, ImageFolderDataset
from utils.errors import DataError, run_cli

logger = logging.getLogger("make_shards")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", default=None,
                        help="Image folder: ImageNet layout (train/ and val/ with class subfolders), class subfolders, "
                             "or loose images (label -1).")
    parser.add_argument("--output_dir", default=None, help="Folder or fsspec URL for the shards (split subfolders kept).")
    parser.add_argument("--samples_per_shard", type=int, default=1000,
                        help="Images per tar shard (ImageNet's 1.28M make 1,282 shards of ~110 MB at 1000).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the order images are written in.")
    parser.add_argument("--no_shuffle", action="store_true", help="Keep the folder's sorted order.")
    parser.add_argument("--index_only", default=None, metavar="URL",
                        help="Only (re)write shards.json for the *.tar shards under this folder or URL.")
    args = parser.parse_args(argv)
    if not args.index_only and not (args.input_dir and args.output_dir):
        parser.error("give --input_dir and --output_dir (or --index_only URL)")
    if args.samples_per_shard < 1:
        parser.error("--samples_per_shard must be at least 1")
    return args


def index_shard(fs, path: str) -> list[list]:
    """``[member name, data offset, size, label]`` of each image in one tar shard (label from ``<key>.cls``, else -1)."""
    images, labels = {}, {}
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)  # webdataset: the key ends at the base name's first dot
            stem, _, extension = base.partition(".")
            key, extension = posixpath.join(folder, stem), "." + extension.lower()
            if extension == ".cls":
                labels[key] = int(tar.extractfile(member).read().decode().strip() or -1)
            elif extension in IMAGE_EXTENSIONS + ARRAY_EXTENSIONS and key not in images:  # not x.seg.png, ...
                images[key] = [member.name, member.offset_data, member.size]
    return [[*images[key], labels.get(key, -1)] for key in images]


def write_index(url: str, classes: list[str] | None = None) -> dict:
    """Write ``shards.json`` for the *.tar shards under ``url``. ``classes``: the class names; by default those of
    the index being replaced, else the label numbers found ("0", "1", ...)."""
    fs, root = filesystem(url)
    names = sorted(PurePosixPath(p).name for p in fs.glob(f"{root.rstrip('/')}/*.tar"))
    if not names:
        raise DataError(f"no *.tar shards under {url}")
    shards = [{"name": name, "samples": index_shard(fs, f"{root}/{name}")} for name in names]
    if classes is None and fs.exists(f"{root}/{INDEX_NAME}"):
        with fs.open(f"{root}/{INDEX_NAME}", "r") as handle:
            classes = json.load(handle).get("classes") or None
    if classes is None:
        top = max((label for shard in shards for *_, label in shard["samples"]), default=-1)
        classes = [str(label) for label in range(top + 1)]
    index = {"format": "webdataset tar shards, indexed by mae-accelerate's make_shards.py", "classes": classes,
             "shards": shards}
    with fs.open(f"{root}/{INDEX_NAME}", "w") as handle:
        json.dump(index, handle)
    total = sum(len(shard["samples"]) for shard in index["shards"])
    logger.info("%s: %d shards, %d images indexed", url, len(names), total)
    return index


def write_shards(folder: Path, url: str, samples_per_shard: int, seed: int | None) -> None:
    dataset = ImageFolderDataset(folder, num_channels=3)
    records = list(dataset.records)
    if seed is not None:
        random.Random(seed).shuffle(records)
    fs, root = filesystem(url)
    fs.makedirs(root, exist_ok=True)
    for stale in fs.glob(f"{root.rstrip('/')}/shard-*.tar"):  # a rerun must not mix with an older, larger one
        fs.rm(stale)
    bar = tqdm(total=len(records), desc=f"shards {url}", unit="img")
    for number, first in enumerate(range(0, len(records), samples_per_shard)):
        with fs.open(f"{root}/shard-{number:06d}.tar", "wb") as handle, tarfile.open(fileobj=handle, mode="w") as tar:
            for position, record in enumerate(records[first:first + samples_per_shard], start=first):
                bar.update()
                key = f"{position:09d}"
                for name, data in ((key + record.path.suffix.lower(), record.path.read_bytes()),
                                   (key + ".cls", str(record.label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    bar.close()
    write_index(url, dataset.classes)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.index_only:
        write_index(args.index_only)
        return
    source = Path(args.input_dir).expanduser()
    if not source.is_dir():
        raise DataError(f"--input_dir {args.input_dir} is not a folder: pass a folder of images")
    splits = [name for name in ("train", "val", "validation") if (source / name).is_dir()]
    seed = None if args.no_shuffle else args.seed
    for split in splits or [None]:
        target = args.output_dir.rstrip("/") + (f"/{split}" if split else "")
        write_shards(source / split if split else source, target, args.samples_per_shard, seed)


if __name__ == "__main__":
    run_cli(main)
