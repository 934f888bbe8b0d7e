"""Counter-based random draws: draw ``slot`` of a sample is a hash of ``(seed, epoch, index, slot)``, so one
sample's draws in a loader worker and a whole batch's on the device are the same numbers (SplitMix64: a sample's
key seeds a stream whose n-th value is the 64-bit finaliser of key + n x golden gamma), in plain int64 tensor ops.

Slots: 0-39 the ten tries of a random resized crop (4 each), 40 the flip, 41-47 seeds of generators for
transforms drawn with torch's own functions, 64 onwards the MAE mask noise (one per patch).
"""
from __future__ import annotations

import torch

CROP_SLOT, FLIP_SLOT, AUGMENT_SLOT, MASK_SLOT, NOISE_SLOT = 0, 40, 41, 42, 64

GAMMA = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64, as the unsigned one does)."""
    x = (x ^ shift_right(x, 30)) * signed(MIX1)
    x = (x ^ shift_right(x, 27)) * signed(MIX2)
    return x ^ shift_right(x, 31)


def sample_keys(seed: int, epochs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B,) int64 keys, one per sample, a function of (run seed, epoch, sample index) only."""
    base = mix64(torch.full_like(indices, signed(seed * GAMMA)))
    return mix64(mix64(base + epochs.to(indices.dtype)) + indices)


class SampleDraws:
    """The draws of a batch of samples, made where ``indices`` live (CPU or GPU), each row a pure function of its
    sample's (seed, epoch, index). :meth:`row` is one sample's, for a transform that works one image at a time."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys

    @classmethod
    def of(cls, seed: int, epochs, indices) -> "SampleDraws":
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return cls(sample_keys(seed, torch.as_tensor(epochs, dtype=torch.int64, device=indices.device), indices))

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, i: int) -> "SampleDraws":
        return SampleDraws(self.keys[i:i + 1])

    def bits(self, first: int, count: int) -> torch.Tensor:
        """(B, count) int64: slots ``first .. first + count - 1`` of every sample."""
        counters = torch.arange(first + 1, first + count + 1, device=self.keys.device, dtype=torch.int64)
        return mix64(self.keys[:, None] + counters * signed(GAMMA))

    def uniform(self, first: int, count: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(B, count) uniform in [0, 1): 53 random bits for float64, 24 for float32 (exact in either)."""
        if dtype == torch.float64:
            return shift_right(self.bits(first, count), 11).to(torch.float64) * 2.0**-53
        return (shift_right(self.bits(first, count), 40).to(torch.float32) * 2.0**-24).to(dtype)

    def seed(self, slot: int) -> int:
        """A 63-bit seed from ``slot`` of the first sample, for a generator of torch's or another library's."""
        return int(shift_right(self.bits(slot, 1), 1)[0, 0])

    def generator(self, slot: int) -> torch.Generator:
        """A CPU generator seeded from ``slot`` of the first sample (mask strategies, RandAugment)."""
        return torch.Generator().manual_seed(self.seed(slot))
