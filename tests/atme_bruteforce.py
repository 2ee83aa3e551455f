"""ATME written straight from DESIGN.md, one image and one block at a time in float64 Python.

Independent of cait_kernels (no shared code): the tests hold the vectorised reference to it.
"""
import math

import torch


def _find(parent, a):
    while parent[a] != a:
        a = parent[a]
    return a


def atme_bruteforce(x, metric, size, owner, *, r, grid, prefix, block):
    """Same signature and outputs as ``atme_step``; x, metric, size in float64."""
    H, W = grid
    xs, sizes, owners = [], [], []
    for img in range(x.shape[0]):
        own = owner[img].tolist()
        n = x.shape[1] - prefix
        m = metric[img, prefix:].double()
        unit = [row / max(float(row.norm()), 1e-12) for row in m]

        def sim(a, b):  # cosine in float64, rounded to float32 (DESIGN: ties are exact on the rounded values)
            return float(torch.tensor(float((unit[a] * unit[b]).sum())).float())

        candidates = []
        for block_id, (top, left) in enumerate((i, j) for i in range(0, H, block) for j in range(0, W, block)):
            bottom, right = min(top + block, H), min(left + block, W)
            pairs = set()
            for i in range(top, bottom):
                for j in range(left, right):
                    for i2, j2 in ((i, j + 1), (i + 1, j)):
                        if i2 < bottom and j2 < right and own[i * W + j] != own[i2 * W + j2]:
                            a, b = own[i * W + j], own[i2 * W + j2]
                            pairs.add((min(a, b), max(a, b)))
            parent = {t: t for p in pairs for t in p}
            for a, b in sorted(pairs, key=lambda p: (-sim(*p), p)):  # Kruskal, ties by token indices
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
                    candidates.append((-sim(a, b), block_id, a, b))
        chosen = sorted(candidates)[:r]
        parent = list(range(n))
        for _, _, a, b in chosen:
            ra, rb = _find(parent, a), _find(parent, b)
            parent[max(ra, rb)] = min(ra, rb)
        root = [_find(parent, t) for t in range(n)]
        survivors = sorted(set(root))
        new_index = {t: k for k, t in enumerate(survivors)}
        s = size[img, prefix:].double()
        feats, cells = [], []
        for t in survivors:
            members = [u for u in range(n) if root[u] == t]
            total = sum(float(s[u]) for u in members)
            feats.append(sum(x[img, prefix + u].double() * s[u] for u in members) / total)
            cells.append(total)
        xs.append(torch.cat([x[img, :prefix].double(), torch.stack(feats)]))
        sizes.append(torch.cat([size[img, :prefix].double(), torch.tensor(cells, dtype=torch.float64)]))
        owners.append(torch.tensor([new_index[root[o]] for o in own], dtype=torch.int32))
    return torch.stack(xs), torch.stack(sizes), torch.stack(owners)


def blocks_of(grid, block):
    """Tile index of every cell, raster order."""
    H, W = grid
    wide = math.ceil(W / block)
    return torch.tensor([(i // block) * wide + j // block for i in range(H) for j in range(W)])
