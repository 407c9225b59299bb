"""Training batches: length-grouped sampling and length-sorted micro-batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    from llmkit.config.schema import TrainConfig

log = logging.getLogger("llmkit")


MEGABATCH, MIN_MEGABATCHES = 50, 4  # batches per mega-batch at most; mega-batches per epoch
MICRO_BATCHES, MICRO_ROWS = 4, 8  # inside grouping: micro-batches per batch at most; rows each


def micro_batches(tc: TrainConfig, inside: bool) -> int:
    """How many length-sorted micro-batches each batch runs in, for a task that groups rows by
    length inside each batch (`Task.group_inside`): 1 where grouping is off or batches are small."""
    return max(1, min(MICRO_BATCHES, tc.batch_size // MICRO_ROWS)) \
        if inside and tc.group_by_length else 1


class LengthGroupedBatches:
    """Batch sampler: a seeded random order per epoch, rows of similar length batched together.

    Across batches (`group`): rows are shuffled, cut into mega-batches of 50 batches, sorted by
    length inside each, split into batches, and the batches shuffled: little padding, and still
    a random walk over the data. An epoch holds at least `MIN_MEGABATCHES` mega-batches
    (Trainer's rule): were the whole set one mega-batch, every epoch would bring nearly the same
    batches, each of one length (on debian-qa, of one question type).

    Inside batches (`split` > 1): each batch is as random as without grouping, and is yielded
    with its rows sorted by length, for `MicroBatches` to pad and run in `split` parts whose
    gradients add up to the batch's: the optimizer steps on the same random batches, and the
    micro-batches pad little. Batches of one length band each hold a sequence-to-sequence model
    trained from scratch on its plateau (benchmarks/RESULTS.md, the seed study), which this
    keeps.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, lengths: Any, batch_size: int, seed: int, group: bool = True,
                 split: int = 1):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group, self.split = group and split == 1, split
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        import numpy as np

        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        lengths = np.asarray(self.lengths)
        if self.group:
            mega = self.batch_size * max(1, min(MEGABATCH, len(order) // (
                self.batch_size * MIN_MEGABATCHES)))
            order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                    for chunk in np.split(order, range(mega, len(order), mega))])
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for batch in batches:
            yield (batch[np.argsort(-lengths[batch], kind="stable")] if self.split > 1
                   else batch).tolist()


class MicroBatches:
    """Collates a batch of rows sorted by length as `split` micro-batches, each padded to its own
    longest row, with each one's share of the batch's loss: its target tokens (labels other than
    -100) over the batch's, so that the shares of the micro-batches' token-mean losses add up
    to the token mean of the whole batch padded at once (`tasks.task.forward_backward`)."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any], split: int):
        self.collate, self.split = collate, split

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        import numpy as np

        if self.split == 1:
            return self.collate(rows)
        parts = [self.collate([rows[i] for i in chunk])
                 for chunk in np.array_split(np.arange(len(rows)), min(self.split, len(rows)))]
        counts = [(part["labels"] != -100).sum() for part in parts]
        total = max(sum(counts), 1)
        return {"micro_batches": parts, "shares": [count / total for count in counts]}
