"""The block tile of the tiled GEMMs (``_tiled``): ``TileConfig``, the production
configuration, and the per-thread choice of configuration (``use_tiles``)."""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

# Limits of every CUDA GPU Numba supports: threads per block, and static shared memory
# per block (more needs dynamic shared memory and an opt-in).
MAX_THREADS_PER_BLOCK = 1024
MAX_STATIC_SHARED_BYTES = 48 * 1024


class TileConfig(NamedTuple):
    """Shape of the tiled GEMMs' block tile.

    ``block_m`` rows (output channels) by ``block_n`` columns (output pixels in the
    forward, taps in the weight gradient) per block, ``block_k`` reduction steps per
    shared-memory stage, and a ``thread_m x thread_n`` register micro-tile per thread
    (each side 1, 2 or 4: one vector load). The block has ``threads`` threads, which
    must divide among the tile's rows, columns and stage depth for the loads.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 16
    thread_m: int = 4
    thread_n: int = 4

    @property
    def threads(self):
        return (self.block_m // self.thread_m) * (self.block_n // self.thread_n)

    def shared_bytes(self, itemsize=8):
        """Static shared memory of one block: the two stage tiles (``_tile_groups``)."""
        groups_m, groups_n = _tile_groups(self)
        return self.block_k * (groups_m * self.thread_m + groups_n * self.thread_n) * itemsize

    def check(self):
        bm, bn, bk, tm, tn = self
        t = self.threads
        if (tm not in (1, 2, 4) or tn not in (1, 2, 4) or bm % tm or bn % tn
                or t % bm or t % bn or t % bk or (bk * bm) % t or (bk * bn) % t):
            raise ValueError(f"unsupported tile configuration {self}")
        # The hardware's limits, which the simulator does not enforce: checked for
        # float64, the larger dtype, so a configuration runs in both.
        if t > MAX_THREADS_PER_BLOCK or self.shared_bytes() > MAX_STATIC_SHARED_BYTES:
            raise ValueError(
                f"tile configuration {self} needs {t} threads and "
                f"{self.shared_bytes()} bytes of shared memory per block in float64; "
                f"a GPU allows {MAX_THREADS_PER_BLOCK} threads and "
                f"{MAX_STATIC_SHARED_BYTES} bytes of static shared memory")
        return self


PRODUCTION_TILES = TileConfig()
_tiles = threading.local()


@contextlib.contextmanager
def use_tiles(config):
    """Use the tile configuration ``config`` (a ``TileConfig``) for calls made by this
    thread inside the block; tests use small tiles, which the simulator runs fast."""
    saved = getattr(_tiles, "value", None)
    _tiles.value = TileConfig(*config).check()
    try:
        yield
    finally:
        _tiles.value = saved


def current_tiles():
    return getattr(_tiles, "value", None) or PRODUCTION_TILES


def _tile_groups(tiles):
    """Shared tiles are ``(block_k, groups, thread_m)`` (``thread_n``): a stage step, a
    thread's group of consecutive tile rows (columns), its lane. The index split lets
    the compiler see each group as one vector. One group more than the tile holds pads
    the rows, which spreads the weight gradient's pixel-fastest stores over the banks.
    """
    return (tiles.block_m // tiles.thread_m + 1, tiles.block_n // tiles.thread_n + 1)
