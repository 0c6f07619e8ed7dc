"""predict.py split across the pods of a Kubernetes Indexed Job, with no coordination.

Each pod lists the whole input and keeps the images whose key (the path relative to INPUT_URI)
hashes to its index: SHA-1 of the key, modulo PREDICT_SHARDS. The assignment depends on the key
alone, so every pod computes the same split, each image lands in exactly one shard, and a pod
started again takes the same images. The shard's document is predictions-{index}.json under
PREDICT_OUTPUT_URI, its annotated images are under images/shard-{index}/.

Environment (through Settings): PREDICT_SHARDS, JOB_COMPLETION_INDEX (set by Kubernetes).
Imports: utils.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Iterator, TypeVar

from utils import BadInput

T = TypeVar("T")


def shard_of(key: str, shards: int) -> int:
    """The shard a key belongs to: stable across processes, machines and Python versions."""
    digest = hashlib.sha1(key.encode("utf-8"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") % shards


class Shard:
    """This run's share of the input: every image (index None) or the images of one shard."""

    def __init__(self, index: int | None, count: int = 1):
        self.index = index
        self.count = count
        self.listed = 0  # images in the whole input, every shard's
        self.taken = 0  # images of this shard

    @property
    def sharded(self) -> bool:
        return self.index is not None

    def select(self, items: Iterable[T], key: Callable[[T], str], input_uri: str) -> Iterator[T]:
        """The items of this shard, lazily, in input order.

        Raises:
            BadInput: the whole input holds no image (every shard would find none).
        """
        for item in items:
            self.listed += 1
            if self.index is None or shard_of(key(item), self.count) == self.index:
                self.taken += 1
                yield item
        if not self.listed:
            raise BadInput(f"INPUT_URI={input_uri}: no images found")

    def document_name(self) -> str:
        return f"predictions-{self.index}.json" if self.sharded else "predictions.json"

    def images_folder(self) -> str:
        """Where annotated images go under PREDICT_OUTPUT_URI: names no other shard can write."""
        return f"images/shard-{self.index}/" if self.sharded else "images/"

    def fields(self) -> dict:
        """What a shard's document says about the split (nothing when unsharded)."""
        if not self.sharded:
            return {}
        return {"shard": self.index, "shards": self.count, "listed": self.listed}
