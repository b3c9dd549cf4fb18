"""Group K-fold: groups never split, deterministic, complete, balanced."""
import random

import pytest

from shards.folds import assign_folds


def _grouped_keys(n_groups=30, seed=0):
    """Keys in groups of 1..8 members, plus noise keys (-1)."""
    rnd = random.Random(seed)
    groups = {}
    for g in range(n_groups):
        for i in range(rnd.randint(1, 8)):
            groups[f"G{g:02d}_{i}"] = g
    for i in range(25):
        groups[f"NOISE_{i:02d}"] = -1
    return groups


def _fold_sizes(assignment, num_folds):
    sizes = [0] * num_folds
    for fold in assignment.values():
        sizes[fold] += 1
    return sizes


def test_groups_never_split_and_noise_spreads():
    groups = _grouped_keys()
    folds = assign_folds(groups, 5, seed=3, groups=groups)
    by_group = {}
    for key, gid in groups.items():
        if gid != -1:
            by_group.setdefault(gid, set()).add(folds[key])
    assert all(len(f) == 1 for f in by_group.values())
    # noise keys are singletons, so they are not all lumped into one fold
    noise_folds = {folds[k] for k, g in groups.items() if g == -1}
    assert len(noise_folds) == 5


def test_deterministic_and_independent_of_input_order():
    groups = _grouped_keys()
    keys = list(groups)
    a = assign_folds(keys, 4, seed=7, groups=groups)
    random.Random(1).shuffle(keys)
    b = assign_folds(keys, 4, seed=7, groups=dict(reversed(list(groups.items()))))
    assert a == b
    assert list(a) == sorted(a)
    assert assign_folds(keys, 4, seed=8, groups=groups) != a  # the seed matters


def test_all_keys_assigned_except_excluded():
    groups = _grouped_keys()
    excluded = ["NOISE_00", "G00_0", "not-a-key"]
    folds = assign_folds(groups, 3, seed=0, groups=groups, exclude=excluded)
    assert set(folds) == set(groups) - set(excluded)
    assert set(folds.values()) == {0, 1, 2}


def test_balance():
    keys = [f"K{i:03d}" for i in range(103)]
    sizes = _fold_sizes(assign_folds(keys, 5, seed=0), 5)
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103  # singletons: as even as possible
    groups = _grouped_keys(n_groups=60, seed=2)
    sizes = _fold_sizes(assign_folds(groups, 5, seed=0, groups=groups), 5)
    largest = max(sum(1 for g in groups.values() if g == gid) for gid in set(groups.values()) - {-1})
    assert max(sizes) - min(sizes) <= largest  # greedy largest-first bound
    assert max(sizes) - min(sizes) <= 2  # and in practice, with small groups, nearly even


def test_keys_missing_from_groups_are_singletons():
    folds = assign_folds(["a", "b", "c", "d"], 3, seed=0, groups={"a": 5, "b": 5})
    assert folds["a"] == folds["b"]
    assert len({folds["a"], folds["c"], folds["d"]}) == 3  # c, d are units of their own
    assert sorted(_fold_sizes(folds, 3)) == [1, 1, 2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_folds"):
        assign_folds(["a", "b"], 1, seed=0)
    with pytest.raises(ValueError, match="duplicate keys: \\['a'\\]"):
        assign_folds(["a", "a", "b"], 2, seed=0)
    with pytest.raises(ValueError, match="1 group\\(s\\) cannot fill 2 folds"):
        assign_folds(["a", "b"], 2, seed=0, groups={"a": 1, "b": 1})
