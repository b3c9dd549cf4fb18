"""Reading shards back (shards.reader): manifest, shard list, sample decoding and its errors."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from shards import reader
from shards.schema import SampleMeta, encode_png


def test_iter_samples_yields_every_sample_in_manifest_order(tiny_shards):
    paths = reader.shard_paths(tiny_shards / "train")
    manifest = reader.read_manifest(tiny_shards / "train")
    assert [p.name for p in paths] == [s["name"] for s in manifest["shards"]]
    samples = list(reader.iter_samples(paths))
    assert [s.key for s in samples] == [k for s in manifest["shards"] for k in s["keys"]]
    for s in samples:
        assert s.input.dtype == np.uint8 and s.input.shape == (64, 64)
        assert s.mask.dtype == bool and s.mask.shape == (64, 64) and s.mask.any()
        assert s.gt.shape == (64, 64, 3)
        assert (s.input[s.mask] == s.meta.fill).all()
        assert s.meta.key == s.key and s.meta.mask_origin == "synthetic"


def test_test_split_samples_have_no_gt(tiny_dacon_shards):
    samples = list(reader.iter_samples(reader.shard_paths(tiny_dacon_shards / "test")))
    assert [s.key for s in samples] == ["TEST_000", "TEST_001", "TEST_002", "TEST_003"]
    assert all(s.gt is None and s.meta.mask_origin == "detected" for s in samples)


def test_missing_dir_manifest_and_shards_are_named(tiny_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reader.shard_paths(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no manifest"):
        reader.shard_paths(tmp_path)
    split = tmp_path / "train"
    shutil.copytree(tiny_shards / "train", split)
    (split / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        reader.shard_paths(split)
    manifest = json.loads((split / "manifest.json").read_text())
    (split / "manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    with pytest.raises(ValueError, match="no shards"):
        reader.shard_paths(split)
    (split / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        reader.read_manifest(split)
    (split / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest"):
        reader.read_manifest(split)


def _raw_sample() -> dict:
    gray = np.full((8, 8), 7, dtype=np.uint8)
    meta = SampleMeta(key="K1", mask_origin="exact", fill=7, hole_fraction=1.0)
    return {"__key__": "K1", "__url__": "/data/x-000003.tar", "input.png": encode_png(gray, "L"),
            "mask.png": encode_png(np.full((8, 8), 255, np.uint8), "L"), "json": meta.to_json_bytes()}


def test_decode_sample_errors_name_key_and_shard():
    ok = reader.decode_sample(_raw_sample())
    assert ok.key == "K1" and ok.mask.all() and ok.gt is None
    cases = {
        "missing member K1.mask.png": {"mask.png": None},
        "cannot decode PNG": {"input.png": b"\x89PNG garbage"},
        "expected PIL mode RGB, got L": {"gt.png": encode_png(np.zeros((8, 8), np.uint8), "L")},
        "image sizes disagree": {"gt.png": encode_png(np.zeros((4, 8, 3), np.uint8), "RGB")},
        "bad json": {"json": b"{"},
    }
    for message, change in cases.items():
        raw = {k: v for k, v in {**_raw_sample(), **change}.items() if v is not None}
        with pytest.raises(ValueError) as info:
            reader.decode_sample(raw)
        assert message in str(info.value) and "'K1'" in str(info.value) and "x-000003.tar" in str(info.value)


def test_corrupt_member_in_a_real_shard_is_reported(tiny_shards, tmp_path):
    source = tiny_shards / "val" / "val-000000.tar"
    broken = tmp_path / "val-000000.tar"
    with tarfile.open(source) as src, tarfile.open(broken, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".gt.png"):
                data = data[:40]  # truncated PNG
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"gt.png: cannot decode PNG") as info:
        list(reader.iter_samples([broken]))
    assert str(broken) in str(info.value)


def test_reader_module_does_not_import_torch():
    code = ("import sys, shards.reader, shards.pack, shards.damage, shards.schema; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_truncated_shard_is_named(tiny_shards, tmp_path):
    source = tiny_shards / "train" / "train-000001.tar"
    broken = tmp_path / "train-000001.tar"
    broken.write_bytes(source.read_bytes()[:3000])  # cut inside the first sample
    with pytest.raises(ValueError) as info:
        list(reader.iter_samples([tiny_shards / "train" / "train-000000.tar", broken]))
    assert str(broken) in str(info.value)
    missing = tmp_path / "gone.tar"
    with pytest.raises(ValueError, match="gone.tar"):
        list(reader.iter_samples([missing]))


def test_decode_sample_without_gt_skips_the_gt_member():
    raw = {**_raw_sample(), "gt.png": encode_png(np.full((8, 8, 3), 9, np.uint8), "RGB")}
    assert reader.decode_sample(raw).gt[0, 0].tolist() == [9, 9, 9]
    assert reader.decode_sample(raw, with_gt=False).gt is None
    raw["gt.png"] = b"\x89PNG garbage"  # not even read: inference never needs it
    assert reader.decode_sample(raw, with_gt=False).input[0, 0] == 7
