"""Training's data order across named subsets (`ingest.subsets`): each batch's share of every subset, by weight.

A run without subsets draws its batches as `pipeline.stages.train` always has (epochs of the whole split). With
subsets, a subject of 12 images beside 1,000 class images is drawn at the shares the user set, not at 1 in 85:

- shares: a subset's `weight` over all weights, or, with weights null, its training images times its `repeats`
  (kohya's num_repeats) over all of those;
- slots: the run's sample slots (batch g holds slots g*b .. g*b+b-1, b = train.batch_size) are dealt to the
  subsets by Sainte-Laguë's divisor rule: a subset's j-th slot "arrives" at (j + 0.5) / share and slots go in
  order of arrival (ties to the subset named first). After any number of batches every subset has had its share
  of the slots to within a slot or so, and a batch's counts follow from the totals before and after it;
- samples: each subset deals its slots from an endless stream of epochs, each a permutation of its training
  samples fixed by (seed, subset, epoch): every image once per pass, whatever its share.

Every batch is a function of (seed, shares, batch size, batch number) alone, with no state carried from one
batch to the next: the same seed gives the same batches, and a resumed run draws exactly what the killed one
would have. With several processes, process p draws batch number micro_batch * processes + p.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pipeline.core.errors import UserError
from pipeline.core.source_params import SubsetParams


class SubsetError(UserError, ValueError):
    """The cached training data and ingest.subsets do not fit together."""


def derived_seed(*parts: object) -> int:
    """A seed for one purpose (an epoch's order, a step's noise) that no other purpose shares."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def subset_shares(subsets: dict[str, SubsetParams], sizes: dict[str, int]) -> np.ndarray:
    """Each subset's share of the drawn samples, in ingest.subsets' order; they sum to 1."""
    if all(subset.weight is not None for subset in subsets.values()):
        raw = np.array([subset.weight for subset in subsets.values()], dtype=np.float64)
    else:
        raw = np.array([sizes[name] * subset.repeats for name, subset in subsets.items()], dtype=np.float64)
    return raw / raw.sum()


def slots_before(shares: np.ndarray, slots: int) -> np.ndarray:
    """How many of the first `slots` sample slots each subset gets under Sainte-Laguë's rule.

    Each subset's first floor(slots * share) - len(shares) - 1 arrivals are surely among the first `slots`
    (fewer than `slots` arrivals come before them), so only the last few are sorted.
    """
    count = len(shares)
    surely = np.maximum(np.floor(slots * shares) - count - 1, 0).astype(np.int64)
    left = slots - int(surely.sum())
    arrivals = [((j + 0.5) / share, subset) for subset, share in enumerate(shares)
                for j in range(int(surely[subset]), int(surely[subset]) + left)]
    taken = np.bincount([subset for _, subset in sorted(arrivals)[:left]], minlength=count)
    return surely + taken


@lru_cache(maxsize=64)
def pass_order(members: int, seed: int, subset: str, epoch: int) -> np.ndarray:
    """One pass over a subset's samples: a permutation of range(members) fixed by (seed, subset, epoch)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "subset", subset, epoch))
    return torch.randperm(members, generator=generator).numpy()


@dataclass(frozen=True)
class SubsetSampler:
    """Batches drawn from named subsets at fixed shares (see the module's docstring)."""

    names: tuple[str, ...]
    members: tuple[np.ndarray, ...]  # each subset's positions in the size group, in split order
    shares: np.ndarray
    batch_size: int
    seed: int

    def batch(self, number: int) -> tuple[int, torch.Tensor]:
        """Batch `number`'s (size group, positions in it): its slots of each subset, subset by subset."""
        start = slots_before(self.shares, number * self.batch_size)
        end = slots_before(self.shares, (number + 1) * self.batch_size)
        drawn = [self.stream(subset, first, last) for subset, (first, last) in enumerate(zip(start, end, strict=True))]
        return 0, torch.from_numpy(np.concatenate(drawn).astype(np.int64))

    def stream(self, subset: int, first: int, last: int) -> np.ndarray:
        """Draws first..last-1 of a subset's endless stream of passes, as positions in the size group."""
        members = self.members[subset]
        draws = np.arange(first, last)
        epochs, places = np.divmod(draws, len(members))
        order = np.empty(len(draws), dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            order[chosen] = pass_order(len(members), self.seed, self.names[subset], int(epoch))[places[chosen]]
        return members[order]

    def describe(self) -> dict[str, float]:
        """The shares by subset: part of the checkpoint's fingerprint, as they decide every batch."""
        return {name: float(share) for name, share in zip(self.names, self.shares, strict=True)}


def subset_sampler(subsets: dict[str, SubsetParams] | None, sample_subsets: list[str], group_count: int,
                   batch_size: int, seed: int) -> SubsetSampler | None:
    """The sampler of a run with named subsets (None without them), from each training sample's subset."""
    if subsets is None:
        return None
    if group_count > 1:
        raise SubsetError("train: ingest.subsets draws from one image size; preprocess.bucketing made "
                          f"{group_count}: set preprocess.bucketing: false")
    labels = np.asarray(sample_subsets, dtype=object)
    unknown = sorted(set(labels) - set(subsets))
    if unknown:
        raise SubsetError(f"train: data/latents holds samples of subset {unknown[0]}, which ingest.subsets does not "
                          "name; run the pipeline from ingest again (dvc repro)")
    members = {name: np.flatnonzero(labels == name) for name in subsets}
    empty = [name for name, positions in members.items() if not len(positions)]
    if empty:
        raise SubsetError(f"ingest.subsets.{empty[0]}: none of its images is in the train split (preprocess "
                          "splits by id, preprocess.val_fraction); add images to it")
    shares = subset_shares(subsets, {name: len(positions) for name, positions in members.items()})
    return SubsetSampler(tuple(subsets), tuple(members.values()), shares, batch_size, seed)
