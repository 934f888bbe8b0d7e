"""The training loader and its batches on the device: worker processes that leave stop signals to the main
process, and a thread that makes the next batch on its own CUDA stream while the current one trains."""
from __future__ import annotations

import atexit
import os
import signal

import torch
from torch.utils.data import DataLoader

from .device_decode import decode_deferred
from .samples import collate_skipping_bad


def build_loader(samples, batch_sampler, num_workers: int, device: torch.device) -> DataLoader:
    """A loader over ``(index, epoch)`` keys. Its private generator keeps the global RNG untouched, so a run
    resumed from a checkpoint (which restores the global RNG) draws the same mixup/erasing as one never stopped."""
    return WorkerLoader(samples, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_skipping_bad,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes are killed at exit if they are still running (their iterator is held by an
    exception's traceback, or was dropped while a worker was busy): they ignore SIGTERM (see ignore_stop_signals), so
    multiprocessing's own clean-up, SIGTERM then join, would wait for them forever."""

    def close(self) -> None:
        """Stop the persistent workers now (close a DeviceBatches thread that reads them first): left to the garbage
        collector, an iterator in a reference cycle is finalised after its queues' feeder threads stopped, and the
        workers never hear the shutdown and live on until the process exits (they ignore SIGTERM)."""
        iterator, self._iterator = getattr(self, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def _get_iterator(self):
        iterator = super()._get_iterator()
        workers = list(getattr(iterator, "_workers", []))
        if workers:  # (registered after multiprocessing's clean-up, so it runs first)
            atexit.register(kill_workers_left, workers, os.getpid())
        return iterator


def kill_workers_left(workers: list, parent_pid: int) -> None:
    left = [worker for worker in workers if os.getpid() == parent_pid and worker.is_alive()]
    if left and hasattr(signal, "SIGCHLD"):  # torch's SIGCHLD handler would report each kill as a worker failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in left:
        worker.kill()


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to the main process, which checkpoints and then shuts them down."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)


def move_to_device(batch: dict, device: torch.device, fence: str = "device", decode: str = "device") -> dict:
    """A loader batch on the device; JPEGs left encoded (``--decode device`` or ``dali``) are decoded and cropped
    there."""
    if "jpeg" in batch:
        batch = decode_deferred(batch, device, fence, decode)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class DeviceBatches:
    """A loader's batches, each on the device (:func:`move_to_device`); ``check`` sees each one on the host first.
    With ``ahead`` (``--decode_ahead``), a thread makes the next batch (on a GPU, on a CUDA stream of its own) while the
    current one trains; its errors are raised where the batch is taken, and iterating again or :meth:`close` stops it.
    """

    _END = object()

    def __init__(self, loader, device: torch.device, ahead: bool = False, check=None, decode: str = "device"):
        self.loader, self.device, self.ahead, self.check, self.decode = loader, device, ahead, check, decode
        self._thread, self._stop, self._stream = None, None, None

    def __iter__(self):
        self.close()
        if not self.ahead:
            return (move_to_device(self._checked(batch), self.device, decode=self.decode) for batch in self.loader)
        import queue
        import threading

        if self.device.type == "cuda" and self._stream is None:  # one stream for the run: the caching allocator
            self._stream = torch.cuda.Stream(self.device)  # keeps freed blocks for the stream that freed them
        batches, self._stop = queue.Queue(maxsize=1), threading.Event()
        self._thread = threading.Thread(target=self._make, args=(iter(self.loader), batches, self._stop), daemon=True,
                                        name="DeviceBatches")  # (the loader's iterator is made here, in this thread)
        self._thread.start()
        return self._take(batches, self._thread, self._stop)

    def _checked(self, batch: dict) -> dict:
        if self.check is not None:
            self.check(batch)
        return batch

    def close(self) -> None:
        """Stop the thread of the last iteration (it finishes the batch it is reading, then exits)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _make(self, loader_iter, batches, stop) -> None:
        import contextlib
        import queue

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                for batch in loader_iter:
                    if stop.is_set():
                        return
                    batch = move_to_device(self._checked(batch), self.device, "stream", self.decode)
                    event = None
                    if self._stream is not None:
                        event = torch.cuda.Event()
                        event.record(self._stream)
                    if not put((batch, event)):
                        return
            put(self._END)
        except BaseException as error:  # raised again in the training thread, where the batch is taken
            put(error)

    def _take(self, batches, thread, stop):
        import queue

        try:
            while True:
                try:
                    item = batches.get(timeout=1.0)
                except queue.Empty:
                    if not thread.is_alive() and batches.empty():
                        raise RuntimeError("the thread making batches ahead (--decode_ahead) died without a word: "
                                           "run without --decode_ahead to see the error") from None
                    continue
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    for value in batch.values():  # freed blocks wait for this stream before the thread's reuses them
                        if isinstance(value, torch.Tensor) and value.is_cuda:
                            value.record_stream(stream)
                yield batch
        finally:  # left early (a stop, an error in the loop): the thread stops at its next batch
            stop.set()
