"""Shared helpers for the digits examples: data, a progress bar, a summary table.

Not an example itself; ``digits_numpy.py`` and ``digits_torch.py`` import it.
"""

import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load(split_seed=0):
    """scikit-learn's 8x8 digits (bundled, no download), stratified 75/25 split.

    Returns ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` float32
    scaled to [0, 1], labels int64. The split is fixed by ``split_seed``.
    """
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25,
                                              random_state=split_seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def batches(n, batch_size, rng):
    """Index arrays of one shuffled epoch over ``n`` samples."""
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class Progress:
    """``\\r epoch 3/12 [#####.....] 45/90 loss 0.123`` on stderr, redrawn in place.

    When stderr is not a terminal only the finished bar of each epoch is written.
    """

    def __init__(self, epoch, epochs, total, width=20, stream=sys.stderr):
        self.head = f"epoch {epoch:>{len(str(epochs))}}/{epochs}"
        self.total, self.width, self.stream = total, width, stream
        self.live = stream.isatty()
        self.text = ""

    def update(self, done, loss):
        filled = self.width * done // self.total
        self.text = (f"\r {self.head} [{'#' * filled}{'.' * (self.width - filled)}] "
                     f"{done:>{len(str(self.total))}}/{self.total} loss {loss:.3f}")
        if self.live:
            self.stream.write(self.text)
            self.stream.flush()

    def close(self, tail=""):
        """End the epoch's line, with ``tail`` (e.g. accuracies) after the bar."""
        self.stream.write(("" if self.live else self.text.lstrip("\r"))
                          + (f"  {tail}" if tail else "") + "\n")
        self.stream.flush()


def summary(rows, headers):
    """Print ``rows`` (lists of cells) under ``headers`` as an aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))  # noqa: E731
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
