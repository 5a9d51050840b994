"""The Square attack (Andriushchenko et al., ECCV 2020), L-infinity: gradient-free, it needs only a model's scores, so
it attacks every model file eval.py loads (checkpoint, MindIR, int8 file, ONNX, TFLite, C folder).

    >>> attack = Square(model.logits, eps=8 / 255, queries=5000)
    >>> adversarial = attack(images, labels)         # normalized float32 images in and out (numpy)

From vertical stripes of +-eps (a sign per channel and column), each query changes the perturbation in one
random square window of every image not yet misclassified to +-eps (a sign per channel), and keeps the change where
the margin loss (the true class's logit less the highest other one) fell. The window's area is a fraction p of the
image, p_init at first and halved on AutoAttack's schedule as the queries go by (P_INIT: AutoAttack's standard
version). An image counts as broken once its margin is negative; images the model misclassifies unperturbed are
not queried.
"""
import numpy as np

from qatcifar import attacks

P_INIT = 0.8  # the first windows' share of the image: AutoAttack's standard version (the paper: 0.05 over 10,000)
DEFAULT_QUERIES = 5000
# Where p halves, as fractions of 10,000 queries (the paper's schedule, scaled to the budget)
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
MAX_DRAWS = 100  # signs redrawn for a window that would not change the image (two draws almost always do)


def window_share(p_init, query, queries):
    """The paper's p_selection: p_init halved at each SCHEDULE point passed (scaled from 10,000 queries)."""
    at = int(query / queries * 10000)
    return p_init / 2 ** sum(at > point for point in SCHEDULE)


def margins(logits, labels):
    """The true class's logit less the highest other one: negative where the image is misclassified."""
    true = logits[np.arange(len(labels)), labels]
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return true - others.max(axis=1)


def few_shapes(logits):
    """logits(images) on batches padded to a power of two (at most the largest batch yet): a compiled graph
    (MindSpore's GRAPH_MODE) is compiled for a few batch sizes, not for every count of images still unbroken."""
    largest = [0]

    def padded(images):
        n = len(images)
        largest[0] = max(largest[0], n)
        size = min(1 << (n - 1).bit_length(), largest[0])
        if size == n:
            return logits(images)
        return logits(np.concatenate([images, np.repeat(images[:1], size - n, axis=0)]))[:n]
    return padded


class Square:
    """The attack with its settings; `logits(normalized images)` is any model's scores (numpy in and out)."""

    method = "square"
    restarts = 1

    def __init__(self, logits, eps, queries=DEFAULT_QUERIES, seed=0, p_init=P_INIT):
        self.logits = few_shapes(logits)
        self.eps, self.steps, self.seed, self.p_init = eps, queries, seed, p_init
        self.rng = np.random.default_rng(seed)
        self.on_steps = lambda steps: None

    def describe(self):
        return f"Square-{self.steps}, eps {self.eps * 255:.3g}/255"

    def settings(self):
        return {"method": self.method, "eps": self.eps, "queries": self.steps, "p_init": self.p_init,
                "seed": self.seed}

    def __call__(self, images, labels):
        clean = attacks.to_pixels(images).astype(np.float32)
        best = clean.copy()
        margin = margins(self.logits(images), labels)
        todo = margin > 0  # (misclassified images are left as they are)
        if self.eps == 0:  # (no window can change an image)
            self.on_steps(self.steps)
            return images.copy()
        n, channels, height, width = clean.shape
        if todo.any():
            stripes = self.eps * self.rng.choice([-1.0, 1.0], (n, channels, 1, width)).astype(np.float32)
            start = np.clip(clean + stripes, 0, 1)
            started = margins(self.logits(attacks.to_normalized(start[todo])), labels[todo])
            best[todo], margin[todo] = start[todo], started
        done = 1
        for query in range(1, self.steps):
            active = np.flatnonzero(margin > 0)
            if not len(active):
                break
            candidate = self.proposal(clean[active], best[active], query, height)
            scores = self.logits(attacks.to_normalized(candidate))
            new = margins(scores, labels[active])
            better = new < margin[active]
            best[active[better]], margin[active[better]] = candidate[better], new[better]
            self.on_steps(1)
            done += 1
        self.on_steps(self.steps - done)
        return attacks.to_normalized(best)

    def proposal(self, clean, best, query, size):
        """Each image's perturbation with one random square window set to +-eps (a sign per channel), redrawn until
        it changes the image (at most MAX_DRAWS times)."""
        n, channels = clean.shape[:2]
        side = int(round(np.sqrt(window_share(self.p_init, query, self.steps) * size * size)))
        side = min(max(side, 1), size - 1)
        rows, cols = self.rng.integers(0, size - side, n), self.rng.integers(0, size - side, n)
        delta = best - clean
        where = window_index(rows, cols, side, channels)
        windows, patch, current = delta[where], clean[where], best[where]
        unchanged, draws = np.ones(n, bool), 0
        while unchanged.any() and draws < MAX_DRAWS:
            draws += 1
            signs = self.eps * self.rng.choice([-1.0, 1.0], (int(unchanged.sum()), channels, 1, 1))
            windows[unchanged] = signs.astype(np.float32)
            unchanged = (np.abs(np.clip(patch + windows, 0, 1) - current) < 1e-7).reshape(n, -1).all(axis=1)
        delta[where] = windows
        return np.clip(clean + delta, 0, 1).astype(np.float32)


def window_index(rows, cols, side, channels):
    """The index of each image's square window at (rows[i], cols[i]) of `side` pixels, every channel: for an
    (N, C, H, W) array, a (N, C, side, side) selection (numpy's advanced indexing: a copy to read, in place to
    write)."""
    n = len(rows)
    r = (rows[:, None] + np.arange(side))[:, None, :, None]
    c = (cols[:, None] + np.arange(side))[:, None, None, :]
    return np.arange(n)[:, None, None, None], np.arange(channels)[None, :, None, None], r, c
