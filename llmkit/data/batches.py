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
# what one more micro-batch's forward and backward cost beyond its padded tokens, in tokens:
# about 30 ms of all-MiniLM-L6-v2 with LoRA on 2 CPU cores, 0.8 ms a token (issue 42)
OVERHEAD = 32


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
    with its rows sorted by length, for `MicroBatches` to pad and run in up to `split` parts
    whose gradients add up to the batch's: the optimizer steps on the same random batches, and the
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


def longest(lengths: Any) -> int:
    return int(lengths.max()) if len(lengths) else 0


class MicroBatches:
    """Collates a batch of rows sorted by length as up to `split` micro-batches, cut where they
    save the most padding (`cuts`), each padded to its own longest row, with each one's share
    of the batch's loss: its target tokens (labels other than -100) over the batch's, so that
    the shares of the micro-batches' token-mean losses add up to the token mean of the whole
    batch padded at once (`tasks.task.forward_backward`)."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any], split: int,
                 longest: int = 0):
        self.collate, self.split, self.longest = collate, split, longest

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        if self.split == 1:
            return self.collate(rows)
        found = cuts([len(row["input_ids"]) for row in rows], self.split, OVERHEAD, self.longest)
        if len(found) == 1:
            return self.collate(rows)
        parts = [self.collate(rows[start:end]) for start, end in found]
        counts = [(part["labels"] != -100).sum() for part in parts]
        total = max(sum(counts), 1)
        return {"micro_batches": parts, "shares": [count / total for count in counts]}


def cuts(lengths: list[int], most: int, overhead: int, longest: int = 0
         ) -> list[tuple[int, int]]:
    """Where to cut a batch of rows sorted longest first into at most `most` micro-batches:
    the cuts that pad and run the fewest tokens, each micro-batch costing `overhead` tokens
    more than its rows times its longest row, and none holding more tokens than `1/most` of
    the rows at the `longest` length of the data (the memory estimate's worst micro-batch).
    A batch of short rows of nearly equal length runs at once; one of a few long rows and many
    short ones, cut where the lengths drop."""
    import numpy as np

    n = len(lengths)
    size = np.asarray(lengths, dtype=np.float64)
    cap = -(-n // most) * max(longest, size[0] if n else 0)
    cost = np.full((most + 1, n + 1), np.inf)
    cost[0, 0] = 0.0
    start = np.zeros((most + 1, n + 1), dtype=np.int64)
    for k in range(1, most + 1):
        for end in range(1, n + 1):
            tokens = (end - np.arange(end)) * size[:end]  # a micro-batch from each start to end
            total = np.where(tokens <= cap, cost[k - 1, :end] + overhead + tokens, np.inf)
            start[k, end] = int(np.argmin(total))
            cost[k, end] = total[start[k, end]]
    k, end, found = int(np.argmin(cost[:, n])), n, []
    while end:
        found.append((int(start[k, end]), end))
        end, k = int(start[k, end]), k - 1
    return found[::-1]
