"""Packing (python -m shards.pack): the real CLI, read back by the stock webdataset reader and by plain tarfile."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import TINY_SIZE, make_dacon_root, run_cli
from shards import damage
from shards.schema import MEMBER_ORDER, SampleMeta, tar_safe_key


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def read_tar_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a split with plain ``tarfile``: {key: {ext: bytes}}, in file order."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(split_dir / shard["name"]) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return samples


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def tree_digest(root: Path, pattern: str = "*") -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "packing" in p.name or p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------------ photos mode
def test_photos_round_trip_with_webdataset_and_tarfile(photo_dir, tiny_shards):
    import webdataset as wds

    sources = {tar_safe_key(p.stem): p for p in photo_dir.iterdir()}
    by_tar = {**read_tar_samples(tiny_shards / "train"), **read_tar_samples(tiny_shards / "val")}
    assert sorted(by_tar) == sorted(sources)
    urls = [str(p) for split in ("train", "val") for p in sorted((tiny_shards / split).glob("*.tar"))]
    by_wds = {raw["__key__"]: raw for raw in wds.WebDataset(urls, shardshuffle=False)}
    assert sorted(by_wds) == sorted(sources)
    for key, members in by_tar.items():
        raw = by_wds[key]
        for ext in ("input.png", "mask.png", "gt.png", "json"):
            assert raw[ext] == members[ext]  # both readers see the same bytes
        gray, mask, gt = png(members["input.png"]), png(members["mask.png"]), png(members["gt.png"])
        meta = SampleMeta.from_json_bytes(members["json"])
        # The gt is the photo, center-cropped and resized exactly as documented.
        expected_gt = np.asarray(ImageOps.fit(Image.open(sources[key]).convert("RGB"), (TINY_SIZE, TINY_SIZE),
                                              method=Image.Resampling.LANCZOS))
        assert gt.shape == (TINY_SIZE, TINY_SIZE, 3) and np.array_equal(gt, expected_gt)
        assert gray.dtype == np.uint8 and gray.shape == (TINY_SIZE, TINY_SIZE)
        assert set(np.unique(mask)) <= {0, 255}
        hole = mask == 255
        assert np.array_equal(gray, damage.apply_damage(damage.to_gray(gt), hole, meta.fill))
        assert meta.key == key and meta.mask_origin == "synthetic" and meta.shape in damage.SHAPES
        assert 0 <= meta.fill <= 100 and 0.01 <= meta.hole_fraction <= 0.15
        assert meta.hole_fraction == pytest.approx(hole.mean())
        assert meta.source_input == sources[key].name


def test_photos_split_and_manifest(tiny_shards):
    manifests = {s: json.loads((tiny_shards / s / "manifest.json").read_text()) for s in ("train", "val")}
    assert manifests["train"]["count"] == 9 and manifests["val"]["count"] == 3
    train_keys = {k for sh in manifests["train"]["shards"] for k in sh["keys"]}
    val_keys = {k for sh in manifests["val"]["shards"] for k in sh["keys"]}
    assert not train_keys & val_keys
    for split, manifest in manifests.items():
        assert manifest["schema_version"] == 1 and manifest["split"] == split
        assert manifest["source"]["kind"] == "photos" and manifest["source"]["seed"] == 0
        assert manifest["mask_stats"]["origin_counts"] == {"synthetic": manifest["count"]}
        assert [s["name"] for s in manifest["shards"]] == [f"{split}-{i:06d}.tar"
                                                           for i in range(len(manifest["shards"]))]
        assert all(s["count"] <= 3 for s in manifest["shards"])
        assert sorted(p.name for p in (tiny_shards / split).iterdir()) == sorted(
            ["manifest.json"] + [s["name"] for s in manifest["shards"]])
        fractions = []
        for shard in manifest["shards"]:
            path = tiny_shards / split / shard["name"]
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard["bytes"] == path.stat().st_size
            assert shard["count"] == len(shard["keys"])
            samples = read_tar_samples(tiny_shards / split)
            fractions += [SampleMeta.from_json_bytes(samples[k]["json"]).hole_fraction for k in shard["keys"]]
        assert sum(s["count"] for s in manifest["shards"]) == manifest["count"]
        stats = manifest["mask_stats"]["hole_fraction"]
        assert stats["min"] == min(fractions) and stats["max"] == max(fractions)
        assert stats["mean"] == pytest.approx(np.mean(fractions))


def test_members_adjacent_sorted_and_normalized(tiny_shards, tiny_dacon_shards):
    for split_dir in (tiny_shards / "train", tiny_dacon_shards / "train", tiny_dacon_shards / "test"):
        manifest = json.loads((split_dir / "manifest.json").read_text())
        all_keys = []
        for shard in manifest["shards"]:
            members = tar_members(split_dir / shard["name"])
            exts = [e for e in MEMBER_ORDER if split_dir.name != "test" or e != "gt.png"]
            assert [m.name for m in members] == [f"{k}.{e}" for k in shard["keys"] for e in exts]
            for m in members:
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            all_keys += shard["keys"]
        assert all_keys == sorted(all_keys) and len(set(all_keys)) == len(all_keys)


def test_photos_pack_is_byte_identical_across_runs_and_worker_counts(photo_dir, tiny_shards, tmp_path):
    args = ["shards.pack", "photos", photo_dir, None, "--size", TINY_SIZE, "--seed", 0, "--val-fraction", 0.25,
            "--shard-size", 3]
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        args[3] = out
        result = run_cli(args + ["--workers", workers])
        assert result.returncode == 0, result.stderr
        digests.append(tree_digest(out))
    reference = digests[0]
    assert digests[1] == reference  # tars and manifests
    assert len(reference) == 6 and tree_digest(tiny_shards, "*.tar") == tree_digest(tmp_path / "w1", "*.tar")
    # Re-running into the same folder replaces it with identical bytes.
    result = run_cli(args + ["--workers", 2])
    assert result.returncode == 0 and tree_digest(tmp_path / "w2") == reference
    # Without a validation split the old val/ goes too (it would overlap the new train/).
    result = run_cli(args[:8] + ["--val-fraction", 0, "--shard-size", 3])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == ["train"]
    assert json.loads((tmp_path / "w2" / "train" / "manifest.json").read_text())["count"] == 12
    # Another seed: other damage and another validation split.
    args[3], args[7] = tmp_path / "seed1", 1
    assert run_cli(args).returncode == 0
    other = tree_digest(tmp_path / "seed1")
    assert other["train/train-000000.tar"] != reference["train/train-000000.tar"]


def test_photos_keys_are_tar_safe_and_unique(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    names = ["a.b.png", "a_b.jpg", "a b.webp", "nested/a.b.bmp", "c.tif", "notes.txt"]
    for name in names:
        (photos / name).parent.mkdir(exist_ok=True)
        if name.endswith(".txt"):
            (photos / name).write_text("not a photo")
            continue
        Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(photos / name)
    out = tmp_path / "out"
    result = run_cli(["shards.pack", "photos", photos, out, "--seed", 3, "--size", 32])
    assert result.returncode == 0, result.stderr
    assert str(out / "train") in result.stdout  # says where the output went
    assert "pack train" in result.stderr and "5/5" in result.stderr  # the progress line
    samples = read_tar_samples(out / "train")
    # Sorted by (safe key, relative path): "a b.webp", "a.b.png", "a_b.jpg", "nested/a.b.bmp".
    sources = {k: SampleMeta.from_json_bytes(v["json"]).source_input for k, v in samples.items()}
    assert sources == {"a_b": "a b.webp", "a_b_2": "a.b.png", "a_b_3": "a_b.jpg", "a_b_4": "nested/a.b.bmp",
                       "c": "c.tif"}
    assert all(png(v["gt.png"]).shape == (32, 32, 3) for v in samples.values())


def test_photos_resize_mode_keeps_the_whole_photo(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, :40] = (250, 0, 0)  # the left third is red: cropping drops it, resizing keeps it
    wide[:, 40:] = np.random.default_rng(0).integers(0, 256, (40, 80, 3))
    Image.fromarray(wide).save(photos / "wide.png")
    for mode, red in (("crop", False), ("resize", True)):
        out = tmp_path / mode
        assert run_cli(["shards.pack", "photos", photos, out, "--seed", 0, "--size", 30,
                        "--resize-mode", mode, "--area-range", "0.01,0.02"]).returncode == 0
        gt = png(read_tar_samples(out / "train")["wide"]["gt.png"])
        assert bool((gt[:, 2] == (250, 0, 0)).all()) == red, mode


def test_photos_val_dir_holds_out_whole_photos(photo_dir, tmp_path):
    train_photos, val_photos = tmp_path / "train_photos", tmp_path / "val_photos"
    files = sorted(photo_dir.iterdir())
    train_photos.mkdir()
    val_photos.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, (val_photos if i < 3 else train_photos) / f.name)
    out = tmp_path / "out"
    result = run_cli(["shards.pack", "photos", train_photos, out, "--seed", 0, "--size", 32, "--val-dir", val_photos])
    assert result.returncode == 0, result.stderr
    val, train = read_tar_samples(out / "val"), read_tar_samples(out / "train")
    assert sorted(val) == sorted(tar_safe_key(f.stem) for f in files[:3])
    assert sorted(train) == sorted(tar_safe_key(f.stem) for f in files[3:])
    assert json.loads((out / "val" / "manifest.json").read_text())["source"]["val_dir"] == str(val_photos)
    both = run_cli(["shards.pack", "photos", train_photos, tmp_path / "o2", "--seed", 0, "--val-dir", val_photos,
                    "--val-fraction", 0.2])
    assert both.returncode == 2 and "--val-dir and --val-fraction both choose val/" in both.stderr
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------------------- dacon mode
def test_dacon_round_trip_exact_and_detected_masks(tiny_dacon_root, tiny_dacon_truth, tiny_dacon_shards):
    import webdataset as wds

    truth = tiny_dacon_truth[1]
    train = read_tar_samples(tiny_dacon_shards / "train")
    test = read_tar_samples(tiny_dacon_shards / "test")
    assert sorted(train) == [f"TRAIN_{i:05d}" for i in range(6)]
    assert sorted(test) == [f"TEST_{i:03d}" for i in range(4)]
    urls = [str(p) for p in sorted((tiny_dacon_shards / "train").glob("*.tar"))]
    assert {raw["__key__"]: raw["input.png"] for raw in wds.WebDataset(urls, shardshuffle=False)} == {
        k: v["input.png"] for k, v in train.items()}
    for key, members in train.items():
        source_input = tiny_dacon_root / "train_input" / f"{key}.png"
        source_gt = tiny_dacon_root / "train_gt" / f"{key}.png"
        assert members["input.png"] == source_input.read_bytes()  # the source PNG, byte for byte
        assert members["gt.png"] == source_gt.read_bytes()
        gray, mask = png(members["input.png"]), png(members["mask.png"]) == 255
        luma = np.asarray(Image.open(source_gt).convert("L"))
        assert np.array_equal(mask, gray != luma)  # the exact-mask rule, independently
        fill = truth["fills"][key]
        assert np.array_equal(mask, truth["masks"][key] & (luma != fill))
        meta = SampleMeta.from_json_bytes(members["json"])
        assert (meta.mask_origin, meta.fill, meta.source_input, meta.source_gt) == (
            "exact", fill, f"train_input/{key}.png", f"train_gt/{key}.png")
        assert meta.hole_fraction == pytest.approx(mask.mean())
    for key, members in test.items():
        assert set(members) == {"input.png", "mask.png", "json"}
        mask = png(members["mask.png"]) == 255
        true = truth["masks"][key]
        meta = SampleMeta.from_json_bytes(members["json"])
        assert meta.mask_origin == "detected" and meta.fill == truth["fills"][key]
        assert (mask & true).sum() / (mask | true).sum() >= 0.9
    manifest = json.loads((tiny_dacon_shards / "test" / "manifest.json").read_text())
    assert manifest["mask_stats"]["origin_counts"] == {"detected": 4} and manifest["skipped"] == []
    assert json.loads((tiny_dacon_shards / "train" / "manifest.json").read_text())["shards"][0]["count"] == 4


def test_dacon_splits_option_and_determinism(tiny_dacon_root, tiny_dacon_shards, tmp_path):
    out = tmp_path / "only_test"
    result = run_cli(["shards.pack", "dacon", tiny_dacon_root, out, "--splits", "test", "--workers", 1])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["test"]
    assert tree_digest(out / "test", "*.tar") == tree_digest(tiny_dacon_shards / "test", "*.tar")
    manifest = json.loads((out / "test" / "manifest.json").read_text())
    packed = json.loads((tiny_dacon_shards / "test" / "manifest.json").read_text())
    assert manifest["shards"] == packed["shards"] and manifest["mask_stats"] == packed["mask_stats"]


# -------------------------------------------------------------------------------------------------------- bad input
def _break_missing(root: Path) -> str:
    (root / "train_input" / "TRAIN_00002.png").unlink()
    return "train_input/TRAIN_00002.png"


def _break_unreadable(root: Path) -> str:
    (root / "train_gt" / "TRAIN_00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return "train_gt/TRAIN_00001.png"


def _break_size(root: Path) -> str:
    path = root / "train_gt" / "TRAIN_00003.png"
    Image.open(path).resize((48, 64)).save(path)
    return "train_input/TRAIN_00003.png"


def _break_gt_mode(root: Path) -> str:
    path = root / "train_gt" / "TRAIN_00004.png"
    Image.open(path).convert("RGBA").save(path)
    return "train_gt/TRAIN_00004.png"


def _break_input_mode(root: Path) -> str:
    path = root / "test_input" / "TEST_001.png"
    Image.open(path).convert("RGB").save(path)
    return "test_input/TEST_001.png"


def _break_csv_row(root: Path) -> str:
    with open(root / "test.csv", "a") as f:
        f.write("TEST_999,./test_input/TEST_999.png\n")
    return "test_input/TEST_999.png"


def _break_no_damage(root: Path) -> str:
    noise = np.random.default_rng(0).integers(0, 256, (TINY_SIZE, TINY_SIZE), dtype=np.uint8)
    Image.fromarray(noise, "L").save(root / "test_input" / "TEST_002.png")
    return "test_input/TEST_002.png"


def _break_no_difference(root: Path) -> str:
    gt = Image.open(root / "train_gt" / "TRAIN_00005.png")
    gt.convert("L").save(root / "train_input" / "TRAIN_00005.png")
    return "train_input/TRAIN_00005.png"


BREAKERS = {
    "missing file": (_break_missing, "input file not found"),
    "unreadable file": (_break_unreadable, "gt is not a readable image"),
    "size mismatch": (_break_size, "differs from gt"),
    "gt not RGB": (_break_gt_mode, "gt is not 8-bit RGB (PIL mode RGBA"),
    "input not gray": (_break_input_mode, "input is not 8-bit gray (PIL mode RGB"),
    "csv row pointing nowhere": (_break_csv_row, "input file not found"),
    "no detectable damage": (_break_no_damage, "no detectable damage"),
    "train pair without difference": (_break_no_difference, "no damage"),
}


@pytest.fixture
def dacon_copy(tiny_dacon_root, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_dacon_root, root)
    return root


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_input_fails_cleanly_or_is_skipped(case, dacon_copy, tmp_path):
    breaker, message = BREAKERS[case]
    bad = breaker(dacon_copy)
    out = tmp_path / "out"
    result = run_cli(["shards.pack", "dacon", dacon_copy, out, "--shard-size", 2])
    assert result.returncode == 2, result.stderr
    assert str(dacon_copy / bad) in result.stderr and message in result.stderr, result.stderr
    assert not out.exists()
    assert leftovers(tmp_path) == []

    result = run_cli(["shards.pack", "dacon", dacon_copy, out, "--shard-size", 2, "--skip-bad"])
    assert result.returncode == 0, result.stderr
    split = "test" if bad.startswith("test") else "train"
    manifest = json.loads((out / split / "manifest.json").read_text())
    assert [s["path"] for s in manifest["skipped"]] == [str(dacon_copy / bad)]
    assert message in manifest["skipped"][0]["error"]
    key = Path(bad).stem
    packed = {k for s in manifest["shards"] for k in s["keys"]}
    assert key not in packed and len(packed) == manifest["count"]
    assert manifest["count"] == (6 if split == "train" else 4) - (0 if "999" in bad else 1)
    assert leftovers(tmp_path) == []


def test_failed_rerun_keeps_the_previous_output(dacon_copy, tmp_path):
    out = tmp_path / "out"
    assert run_cli(["shards.pack", "dacon", dacon_copy, out]).returncode == 0
    before = tree_digest(out)
    _break_no_damage(dacon_copy)
    result = run_cli(["shards.pack", "dacon", dacon_copy, out])
    assert result.returncode == 2 and "TEST_002.png" in result.stderr
    assert tree_digest(out) == before
    assert leftovers(tmp_path) == []


def test_bad_csv_and_folders(tmp_path, dacon_copy):
    (dacon_copy / "train.csv").write_text("input,gt\nx.png,y.png\n")
    result = run_cli(["shards.pack", "dacon", dacon_copy, tmp_path / "o1"])
    assert result.returncode == 2
    assert str(dacon_copy / "train.csv") in result.stderr and "missing column(s)" in result.stderr
    result = run_cli(["shards.pack", "dacon", tmp_path / "nowhere", tmp_path / "o2"])
    assert result.returncode == 2 and "data root not found" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(["shards.pack", "photos", empty, tmp_path / "o3", "--seed", 0])
    assert result.returncode == 2 and f"{empty}: no photos" in result.stderr
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_bad_photo_is_named_or_skipped(photo_dir, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(photo_dir, photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "out"
    args = ["shards.pack", "photos", photos, out, "--seed", 0, "--size", 32]
    result = run_cli(args)
    assert result.returncode == 2 and f"{photos / 'broken.jpg'}: photo is not a readable image" in result.stderr
    assert not out.exists()
    result = run_cli(args + ["--skip-bad"])
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["count"] == 12 and [s["path"] for s in manifest["skipped"]] == [str(photos / "broken.jpg")]


def test_make_dacon_root_is_reproducible(tmp_path):
    """The fixture generator itself: same seed, same files (other suites rely on it)."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_dacon_root(a, n_train=2, n_test=1)
    make_dacon_root(b, n_train=2, n_test=1)
    assert tree_digest(a) == tree_digest(b)
