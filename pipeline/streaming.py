"""🤗 datasets streamed (``--dataset hf:NAME --streaming``): nothing is downloaded ahead; every loader worker of
every process reads its own part of the data files (``IterableDataset.shard``, or ``split_dataset_by_node`` row by
row when there are fewer files than parts), shuffled through a buffer, epoch after epoch.

Epochs have a fixed size (``--max_samples`` or the split's row count), cut into equal shares: a part that runs out
starts its epoch's stream again (a few images repeat), a longer one leaves its last images for the next epoch's
shuffle. A run resumed on the same number of processes and loader workers continues exactly where it stopped: each
worker re-reads its epoch's stream up to its position, without decoding the images; on another layout the parts
differ, so the images do too (not exact, the log says so).
"""
from __future__ import annotations

import io
import itertools
import logging

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from utils.errors import DataError

from .loading import WorkerLoader, ignore_stop_signals
from .samples import SeededSamples, collate_skipping_bad
from .sampling import StepSampler
from .sources import HubOptions, hub_columns, load_hub_split
from .transforms import to_channels

logger = logging.getLogger(__name__)


def open_stream(name: str, split: str, options: HubOptions, require_split: bool = False):
    """The split as a 🤗 ``IterableDataset`` whose image column stays encoded (decoded by the loader workers)."""
    import datasets

    stream = load_hub_split(name, split, streaming=True, require_split=require_split, options=options)
    column, label = hub_columns(stream.column_names or [], options.image_column, options.label_column)
    return stream.cast_column(column, datasets.Image(decode=False)), column, label


def decode_row(row: dict, image_column: str, label_column: str | None, num_channels: int):
    """A stream row -> ``(uint8 (C, H, W), label)``, or None for an image that does not decode."""
    try:
        value = row[image_column]
        if value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        else:  # a file of the dataset's repository or archive (hf://, zip://...): datasets opens those
            import datasets

            image = datasets.Image().decode_example(value)
        pixels = to_channels(image, num_channels)
    except Exception as error:  # a broken file in a stream: skipped and counted, as in the other sources
        logger.warning("skipping an unreadable streamed image (%s)", error)
        return None
    label = row.get(label_column) if label_column else -1
    return pixels, label if isinstance(label, int) else -1


def epoch_size(stream, max_samples: int | None) -> int:
    """Images per epoch: ``--max_samples``, else the row count the dataset's metadata gives."""
    if max_samples:
        return max_samples
    split = str(stream.split)
    splits = getattr(stream.info, "splits", None) or {}
    rows = getattr(splits.get(split), "num_examples", None) if split in splits else None
    if not rows:
        raise DataError("this streamed dataset does not say how many rows it has: pass --max_samples N, the "
                        "images per epoch")
    return rows


class StreamEpochs(StepSampler):
    """The loop's view of a stream: ``steps_per_epoch`` steps of the global batch per epoch (no indices: the workers
    read the stream); a checkpoint records how many parts the data was split into."""

    def __init__(self, samples_per_epoch: int, per_process_batch: int, accumulation_steps: int, num_processes: int,
                 rank: int, seed: int, num_workers: int):
        super().__init__(per_process_batch, accumulation_steps, num_processes, rank, seed)
        self.num_workers = max(1, num_workers)
        self.steps_per_epoch = samples_per_epoch // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"an epoch of {samples_per_epoch} streamed images is less than one global batch of "
                            f"{self.global_batch}: lower --per_gpu_batch_size or raise --max_samples")

    def state_dict(self, step: int) -> dict:
        return {"stream_parts": self.num_processes * self.num_workers}


class _Current(Dataset):
    """The row being made into a sample (SeededSamples reads its image through ``base[index]``)."""

    item = None

    def __getitem__(self, index):
        return self.item


class HubStream(IterableDataset):
    """This process's training samples from a stream, from optimizer step ``first_step`` on. The epoch's micro-batch
    ``j`` comes from part ``rank x workers + j % workers`` of the data, at position ``j // workers`` of that part's
    stream, whichever loader worker makes it (a loader's new iterator starts at worker 0, so after a resume a
    worker's parts shift). Each sample's crop, flip and mask come from the seed of ``(seed, epoch, position)``."""

    def __init__(self, stream, image_column: str, label_column: str | None, num_channels: int, schedule: StreamEpochs,
                 transform, num_patches: int = 0, noise_fn=None, buffer_size: int = 10_000):
        self.stream, self.image_column, self.label_column = stream, image_column, label_column
        self.num_channels, self.schedule, self.buffer_size = num_channels, schedule, buffer_size
        self.samples = SeededSamples(_Current(), transform, schedule.seed, num_patches, noise_fn)
        self.first_step = 0

    def part(self, part: int, parts: int, epoch: int):
        """One worker's share of the data for ``epoch``: its data files (or every parts-th row), shuffled."""
        from datasets.distributed import split_dataset_by_node

        data = self.stream
        data = data.shard(parts, part, contiguous=False) if data.n_shards >= parts else \
            split_dataset_by_node(data, part, parts)
        data = data.shuffle(seed=self.schedule.seed, buffer_size=self.buffer_size)
        data.set_epoch(epoch)
        return data

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        plan = self.schedule
        per_epoch = plan.steps_per_epoch * plan.accumulation_steps  # micro-batches
        epoch, step = divmod(self.first_step, plan.steps_per_epoch)
        first = step * plan.accumulation_steps  # the epoch's first micro-batch still to make
        role = (self.first_step * plan.accumulation_steps + worker) % workers  # this worker makes micro-batches
        while True:  # g of the run with g % workers == role; g = epoch x per_epoch + j
            residue = (role - epoch * per_epoch) % workers  # its micro-batches' j % workers in this epoch
            start = first + (residue - first) % workers  # its first one
            part, parts = plan.rank * workers + residue, plan.num_processes * workers
            rows = itertools.islice(self.repeated(part, parts, epoch), (start // workers) * plan.micro_batch,
                                    len(range(residue, per_epoch, workers)) * plan.micro_batch)
            for position, row in enumerate(rows, start=(start // workers) * plan.micro_batch):
                self.samples.base.item = decode_row(row, self.image_column, self.label_column, self.num_channels)
                yield self.samples[(part + parts * position, epoch)]
            epoch, first = epoch + 1, 0

    def repeated(self, part: int, parts: int, epoch: int):
        """The epoch's stream of this part, started again when it ends before the part's share is read. (Read with
        ``iter``: iterating a 🤗 IterableDataset in a loader worker would split it among the workers once more.)"""
        while True:
            empty = True
            for batch in self.part(part, parts, epoch).iter(batch_size=32):
                for values in zip(*batch.values()):
                    empty = False
                    yield dict(zip(batch.keys(), values))
            if empty:
                raise DataError(f"part {part} of {parts} of the stream has no rows: there are fewer rows than "
                                "processes x loader workers; lower --num_workers")


def build_stream_loader(stream: HubStream, num_workers: int, device: torch.device) -> WorkerLoader:
    """Micro-batches of ``stream``, its workers' batches interleaved in order (the loader's default)."""
    return WorkerLoader(stream, batch_size=stream.schedule.micro_batch, num_workers=num_workers,
                        collate_fn=collate_skipping_bad, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)


class HeadDataset(Dataset):
    """The first rows of a stream, kept in memory (fixed pictures, a PCA fit): items as the indexed sources give."""

    def __init__(self, name: str, split: str, count: int, num_channels: int, options: HubOptions):
        stream, image_column, label_column = open_stream(name, split, options)  # (a train-only set: its first rows)
        rows = (decode_row(row, image_column, label_column, num_channels) for row in stream)
        self.items = [item for item in itertools.islice(rows, count) if item is not None]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]
