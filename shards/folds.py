"""Group K-fold assignment: near-duplicate groups never span folds, so validation does not leak.

``groups`` is the ``manifest.json`` ``groups`` map written by ``shards.curate`` (KEY -> cluster id). Group id -1
(HDBSCAN noise) and keys absent from ``groups`` are singletons. Folds are balanced by sample count with the greedy
largest-group-first rule; ties between equal-sized groups are broken by a permutation drawn from ``seed``, so the
result depends only on (the set of keys, num_folds, seed, groups, exclude), never on the input order.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Hashable, Iterable, Mapping

import numpy as np

NOISE = -1


def assign_folds(
    keys: Iterable[str],
    num_folds: int,
    seed: int,
    groups: Mapping[str, Hashable] | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, int]:
    """Map every key not in ``exclude`` to a fold in ``range(num_folds)``, keeping each group in one fold."""
    keys = list(keys)
    dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate keys: {dupes[:5]}")
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    groups = groups or {}
    excluded = set(exclude)

    members: dict[tuple, list[str]] = defaultdict(list)
    for key in sorted(set(keys) - excluded):
        gid = groups.get(key, NOISE)
        # Noise (and ungrouped keys) get a unit of their own; the tag keeps them apart from real group ids.
        unit = ("key", key) if gid is None or gid == NOISE else ("group", str(gid))
        members[unit].append(key)
    if len(members) < num_folds:
        raise ValueError(f"{len(members)} group(s) cannot fill {num_folds} folds")

    units = sorted(members)
    order = np.random.default_rng(seed).permutation(len(units))
    # Stable sort: largest first, the seeded permutation decides among equal sizes.
    shuffled = [units[i] for i in order]
    shuffled.sort(key=lambda u: -len(members[u]))

    fold_sizes = [0] * num_folds
    assignment: dict[str, int] = {}
    for unit in shuffled:
        fold = min(range(num_folds), key=lambda f: (fold_sizes[f], f))
        fold_sizes[fold] += len(members[unit])
        for key in members[unit]:
            assignment[key] = fold
    return dict(sorted(assignment.items()))
