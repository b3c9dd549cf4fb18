"""restore.score against an independent, straightforward re-implementation of the official DACON metric."""
import cv2
import numpy as np
import pytest
import skimage.data
from numpy.lib.stride_tricks import sliding_window_view
from skimage.metrics import structural_similarity

from restore import score as S

# ----------------------------------------------------------------------------------- the reference implementation
WIN, K1, K2 = 7, 0.01, 0.03


def ref_ssim_channel(x, y, data_range):
    """SSIM of one channel (any number of spatial dims): every full 7^d window (= skimage's crop of 3 at each edge),
    sample (co)variance (ddof 1), then the plain mean over windows."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    shape = (WIN,) * x.ndim
    axes = tuple(range(x.ndim, 2 * x.ndim))
    xw, yw = sliding_window_view(x, shape), sliding_window_view(y, shape)
    mx, my = xw.mean(axis=axes), yw.mean(axis=axes)
    n = WIN ** x.ndim
    dx = xw - np.expand_dims(mx, axes)
    dy = yw - np.expand_dims(my, axes)
    vx = (dx * dx).sum(axis=axes) / (n - 1)
    vy = (dy * dy).sum(axis=axes) / (n - 1)
    cxy = (dx * dy).sum(axis=axes) / (n - 1)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean()


def ref_ssim(gt, pred):
    r = float(pred.max()) - float(pred.min())
    return np.mean([ref_ssim_channel(gt[..., c], pred[..., c], r) for c in range(3)])


def ref_masked_ssim(gt, pred, mask):
    r = float(pred.max()) - float(pred.min())
    rows, cols = np.nonzero(mask)  # row-major order, like gt[mask]
    g, p = gt[rows, cols], pred[rows, cols]
    return np.mean([ref_ssim_channel(g[:, c], p[:, c], r) for c in range(3)])


def ref_hist_sim(gt, pred):
    def hist(img):
        hue = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[:, :, 0]
        counts = np.bincount(hue.ravel(), minlength=180).astype(np.float64)
        return counts / np.linalg.norm(counts)

    return np.corrcoef(hist(gt), hist(pred))[0, 1]


# ----------------------------------------------------------------------------------- fixtures
def _photo(name, size=64):
    img = getattr(skimage.data, name)()
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def _random_case(rng, size=48):
    """A gt with structure and a prediction that is a distorted version of it (so all terms spread over (−1, 1])."""
    name = ["astronaut", "coffee", "chelsea", "rocket"][rng.integers(4)]
    gt = _photo(name, size)
    kind = rng.integers(3)
    if kind == 0:  # noisy copy
        pred = gt.astype(int) + rng.normal(0, rng.uniform(2, 60), gt.shape)
    elif kind == 1:  # unrelated random image
        pred = rng.integers(0, 256, gt.shape)
    else:  # color-shifted, blurred copy
        pred = cv2.GaussianBlur(gt, (5, 5), 0).astype(int) + rng.integers(-40, 40, 3)
    pred = np.clip(pred, 0, 255).astype(np.uint8)
    mask = np.zeros(gt.shape[:2], bool)
    y0, x0 = rng.integers(0, size - 10, 2)
    h, w = rng.integers(3, size - max(y0, x0), 2)
    mask[y0:y0 + h, x0:x0 + w] = True
    mask ^= rng.random(mask.shape) < 0.05  # ragged edges and islands: the raster order matters
    return gt, pred, mask


# ----------------------------------------------------------------------------------- agreement with the reference
def test_matches_reference_on_random_images_and_masks():
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(30):
        gt, pred, mask = _random_case(rng)
        out = S.score_image(gt, pred, mask)
        ref = {"ssim": ref_ssim(gt, pred), "masked_ssim": ref_masked_ssim(gt, pred, mask),
               "hist_sim": ref_hist_sim(gt, pred)}
        for name, value in ref.items():
            assert out[name] == pytest.approx(value, abs=1e-6), name
        assert out["score"] == pytest.approx(0.2 * ref["ssim"] + 0.4 * ref["masked_ssim"] + 0.4 * ref["hist_sim"],
                                             abs=1e-6)
        assert out["degenerate"] == []
        seen.append(out["score"])
    assert max(seen) - min(seen) > 0.5  # the cases really differ


def test_matches_the_official_call_literally():
    rng = np.random.default_rng(1)
    gt, pred, mask = _random_case(rng, size=64)
    rng_ = pred.max() - pred.min()
    assert S.ssim(gt, pred) == structural_similarity(gt, pred, channel_axis=-1, data_range=rng_)
    assert S.masked_ssim(gt, pred, mask) == structural_similarity(gt[mask], pred[mask], channel_axis=-1,
                                                                  data_range=rng_)


def test_masked_term_depends_on_row_major_order():
    rng = np.random.default_rng(2)
    gt, pred, mask = _random_case(rng)
    rows, cols = np.nonzero(mask)
    col_major = np.lexsort((rows, cols))
    r = float(pred.max()) - float(pred.min())
    by_column = np.mean([ref_ssim_channel(gt[rows, cols][col_major, c], pred[rows, cols][col_major, c], r)
                         for c in range(3)])
    assert S.masked_ssim(gt, pred, mask) != pytest.approx(by_column, abs=1e-3)


# ----------------------------------------------------------------------------------- known values
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_identical_images_score_one(name):
    img = _photo(name)
    mask = np.zeros(img.shape[:2], bool)
    mask[10:30, 20:40] = True
    out = S.score_image(img, img.copy(), mask)
    assert out == {"score": pytest.approx(1.0), "ssim": pytest.approx(1.0), "masked_ssim": pytest.approx(1.0),
                   "hist_sim": pytest.approx(1.0), "degenerate": []}


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_red_blue_swap_lowers_hist_sim(name):
    img = _photo(name)
    assert S.hist_sim(img, img[..., ::-1].copy()) < 0.5


def test_gray_prediction_has_hue_zero_only():
    img = _photo("coffee")
    gray = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    assert S.hist_sim(img, gray) == pytest.approx(ref_hist_sim(img, gray), abs=1e-6)
    assert S.hist_sim(img, gray) < 0.5


# ----------------------------------------------------------------------------------- edge cases
def test_fewer_than_seven_hole_pixels():
    img = _photo("astronaut")
    pred = np.clip(img.astype(int) + 20, 0, 255).astype(np.uint8)
    mask = np.zeros(img.shape[:2], bool)
    with pytest.raises(ValueError):  # what the official call does
        structural_similarity(img[mask], pred[mask], channel_axis=-1, data_range=255)
    for n in (0, 1, 6):
        mask = np.zeros(img.shape[:2], bool)
        mask.flat[:n] = True
        out = S.score_image(img, pred, mask)
        assert out["masked_ssim"] == 0.0 and out["degenerate"] == ["small_hole"]
        assert out["ssim"] == pytest.approx(ref_ssim(img, pred), abs=1e-6)
    mask.flat[:7] = True
    out = S.score_image(img, pred, mask)
    assert out["degenerate"] == [] and out["masked_ssim"] == pytest.approx(ref_masked_ssim(img, pred, mask), abs=1e-6)


def test_constant_prediction():
    img = _photo("chelsea")
    img[40:60, 40:60] = 77  # flat gt windows: 0/0 there once C1 = C2 = 0
    pred = np.full_like(img, 128)
    mask = np.zeros(img.shape[:2], bool)
    mask[5:25, 5:25] = True
    with np.errstate(invalid="ignore", divide="ignore"):
        official = structural_similarity(img, pred, channel_axis=-1, data_range=0)
    assert np.isnan(official)  # what the official call gives
    out = S.score_image(img, pred, mask)
    assert out["ssim"] == 0.0 and out["masked_ssim"] == 0.0
    assert out["degenerate"] == ["constant_prediction"]
    assert out["hist_sim"] == pytest.approx(ref_hist_sim(img, pred), abs=1e-6)
    assert out["score"] == pytest.approx(0.4 * out["hist_sim"])
    both = S.score_image(img, pred, np.zeros(img.shape[:2], bool))
    assert both["degenerate"] == ["small_hole", "constant_prediction"]


def test_uint8_mask_is_accepted():
    img = _photo("rocket")
    pred = img[::-1].copy()
    mask = np.zeros(img.shape[:2], bool)
    mask[3:40, 9:30] = True
    assert S.masked_ssim(img, pred, np.where(mask, 255, 0).astype(np.uint8)) == S.masked_ssim(img, pred, mask)


_RGB32 = np.zeros((32, 32, 3), np.uint8)


@pytest.mark.parametrize("gt, pred, mask, message", [
    (np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 3), np.uint8), None, "gt: expected dtype uint8, got float32"),
    (np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8), None, r"pred: expected an RGB array .*\(32, 32\)"),
    (np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 4), np.uint8), None, "gt: expected an RGB array"),
    (np.zeros((32, 32, 3), np.uint8), np.zeros((32, 16, 3), np.uint8), None, "shape mismatch"),
    (np.zeros((6, 32, 3), np.uint8), np.zeros((6, 32, 3), np.uint8), None, "smaller than the 7x7"),
    (_RGB32, _RGB32, np.zeros((32, 31), bool), "mask: expected shape"),
    (_RGB32, _RGB32, np.zeros((32, 32)), "mask: expected a bool"),
    (_RGB32, _RGB32, np.ones((32, 32), np.uint8), "mask: expected a bool"),
])
def test_bad_inputs(gt, pred, mask, message):
    with pytest.raises(ValueError, match=message):
        S.score_image(gt, pred, np.zeros(gt.shape[:2], bool) if mask is None else mask)


# ----------------------------------------------------------------------------------- aggregation (DDP sums)
def test_summarize_and_sums_add_up_across_ranks():
    rng = np.random.default_rng(3)
    items = [S.score_image(*_random_case(rng)) for _ in range(5)]
    img = _photo("astronaut")
    items.append(S.score_image(img, np.zeros_like(img), np.zeros(img.shape[:2], bool)))  # degenerate
    whole = S.summarize(items)
    assert whole["n"] == 6 and whole["n_degenerate"] == 1
    for name in ("score", "ssim", "masked_ssim", "hist_sim"):
        assert whole[name] == pytest.approx(np.mean([it[name] for it in items]))
    # two "ranks" all-reducing their sums give the same summary
    rank0, rank1 = S.score_sums(items[:2]), S.score_sums(items[2:])
    assert len(rank0) == len(S.SCORE_FIELDS)
    reduced = [a + b for a, b in zip(rank0, rank1)]
    assert S.summarize_sums(reduced) == pytest.approx(whole)
    with pytest.raises(ValueError, match="no images"):
        S.summarize([])
    with pytest.raises(ValueError, match="expected 6 sums"):
        S.summarize_sums([1.0, 2.0])


# ----------------------------------------------------------------------------------- the CLI on real shards
import json  # noqa: E402
import zipfile  # noqa: E402

from PIL import Image  # noqa: E402

from conftest import run_cli  # noqa: E402
from shards.reader import iter_samples, shard_paths  # noqa: E402


@pytest.fixture(scope="module")
def val_split(tiny_shards):
    split = tiny_shards / "val"
    return split, {s.key: s for s in iter_samples(shard_paths(split))}


def _write_preds(folder, samples, make):
    folder.mkdir()
    for key, s in samples.items():
        Image.fromarray(make(s)).save(folder / f"{key}.png")
    return folder


def _gray_pred(s):
    return np.repeat(s.input[:, :, None], 3, axis=2)


def test_cli_perfect_predictions_score_one(tmp_path, val_split):
    split, samples = val_split
    preds = _write_preds(tmp_path / "pred", samples, lambda s: s.gt)
    res = run_cli(["restore.score", preds, split, "--json", "--per-image"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"score", "ssim", "masked_ssim", "hist_sim", "n", "n_degenerate", "per_image"}
    assert out["n"] == len(samples) == 3 and out["n_degenerate"] == 0
    for name in ("score", "ssim", "masked_ssim", "hist_sim"):
        assert out[name] == pytest.approx(1.0)
    assert set(out["per_image"]) == set(samples)
    assert out["per_image"][next(iter(samples))]["degenerate"] == []


def test_cli_zip_of_gray_predictions_matches_reference(tmp_path, val_split):
    split, samples = val_split
    preds = _write_preds(tmp_path / "pred", samples, _gray_pred)
    archive = tmp_path / "submission.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(preds.iterdir()):
            zf.write(p, p.name)
    res = run_cli(["restore.score", archive, split, "--json"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "per_image" not in out
    refs = [0.2 * ref_ssim(s.gt, _gray_pred(s)) + 0.4 * ref_masked_ssim(s.gt, _gray_pred(s), s.mask)
            + 0.4 * ref_hist_sim(s.gt, _gray_pred(s)) for s in samples.values()]
    assert out["score"] == pytest.approx(np.mean(refs), abs=1e-6)
    assert out["score"] < 0.9
    text = run_cli(["restore.score", archive, split])  # the plain-text form prints the three terms and the score
    assert text.returncode == 0
    lines = dict(line.split()[:2] for line in text.stdout.splitlines())
    assert float(lines["score"]) == pytest.approx(out["score"], abs=1e-6)
    assert {"ssim", "masked_ssim", "hist_sim", "n"} <= set(lines)


def test_cli_bad_predictions(tmp_path, val_split, capsys):
    """In-process ``main`` (the same code as the CLI; saves a process start per case)."""
    split, samples = val_split

    def run(*args):
        code = S.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    keys = sorted(samples)
    preds = _write_preds(tmp_path / "pred", samples, lambda s: s.gt)

    (preds / f"{keys[0]}.png").unlink()
    (preds / "EXTRA_1.png").write_bytes((preds / f"{keys[1]}.png").read_bytes())
    code, out, err = run(preds, split)
    assert code == 2 and out == ""
    assert f"missing predictions for 1 key(s): {keys[0]}" in err
    assert "EXTRA_1.png" in err and "no gt" in err
    (preds / "EXTRA_1.png").unlink()

    Image.fromarray(samples[keys[0]].input).save(preds / f"{keys[0]}.png")  # gray, mode L
    code, out, err = run(preds, split)
    assert code == 2 and f"{keys[0]}.png: expected an RGB PNG, got PIL mode L" in err

    Image.fromarray(samples[keys[0]].gt[:32]).save(preds / f"{keys[0]}.png")
    code, out, err = run(preds, split)
    assert code == 2 and f"{keys[0]}.png: size 64x32, expected 64x64" in err

    (preds / f"{keys[0]}.png").write_bytes(b"not a png")
    code, out, err = run(preds, split)
    assert code == 2 and f"{keys[0]}.png: cannot read as PNG" in err

    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as zf:
        for key in keys:
            zf.writestr(f"sub/{key}.png", b"")
    code, out, err = run(nested, split)
    assert code == 2 and "inside a folder (the zip must be flat)" in err

    code, out, err = run(tmp_path / "nothing", split)
    assert code == 2 and "nothing: no such file or folder" in err
    code, out, err = run(preds, tmp_path)
    assert code == 2 and "no manifest" in err

    (preds / f"{keys[0]}.png").unlink()
    res = run_cli(["restore.score", preds, split, "--json"])  # and the real process exits 2 as well
    assert res.returncode == 2 and res.stdout == "" and f"missing predictions for 1 key(s): {keys[0]}" in res.stderr
