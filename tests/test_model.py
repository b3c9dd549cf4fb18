"""The two-stage model: shapes, the pass-through of known pixels, CBAM, the spec, checkpoints, local encoder weights."""
from __future__ import annotations

import dataclasses
import json

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file

from restore.model import (
    CBAM,
    ModelSpec,
    build_model,
    compose_chroma,
    inference_checkpoint,
    load_restorer,
    resolve_checkpoint,
    rgb_to_luma,
)

# The smallest encoders that build offline: timm's test networks (about 0.5M and 1.6M parameters with this decoder).
TINY = ModelSpec(encoder="tu-test_efficientnet", decoder_channels=(32, 16, 16, 8, 8))
TINY_WIDE = dataclasses.replace(TINY, encoder="tu-test_resnet")


def _inputs(b=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    gray = torch.rand(b, 1, h, w, generator=g)
    mask = torch.zeros(b, 1, h, w)
    mask[:, :, h // 4 : h // 2, w // 3 : (2 * w) // 3] = 1.0
    gray = torch.where(mask > 0, torch.full_like(gray, 0.3), gray)  # the constant fill of real damage
    return gray, mask


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.mark.parametrize("size", [(64, 64), (70, 45), (13, 20)])
def test_any_size_gives_same_size_outputs_in_range(tiny_model, size):
    gray, mask = _inputs(h=size[0], w=size[1])
    with torch.no_grad():
        restored, rgb = tiny_model(gray, mask)
    assert restored.shape == (2, 1, *size) and rgb.shape == (2, 3, *size)
    for t in (restored, rgb):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        assert t.min() >= 0.0 and t.max() <= 1.0


def test_stage1_passes_known_pixels_through_exactly(tiny_model):
    gray, mask = _inputs(h=70, w=45)
    with torch.no_grad():
        restored = tiny_model.inpaint(gray, mask)
    known = mask == 0
    assert torch.equal(restored[known], gray[known])
    assert not torch.equal(restored[~known], gray[~known])  # the hole is changed by the residual


def test_channels_last_bf16_autocast_keeps_known_pixels_and_fp32_outputs():
    torch.manual_seed(0)
    model = build_model(TINY).to(memory_format=torch.channels_last)
    gray, mask = _inputs(h=64, w=64)
    gray, mask = gray.to(memory_format=torch.channels_last), mask.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        restored, rgb = model(gray, mask)
    (restored.mean() + rgb.mean()).backward()
    assert restored.dtype == torch.float32 and rgb.dtype == torch.float32
    assert torch.equal(restored[mask == 0], gray[mask == 0])
    assert rgb.min() >= 0 and rgb.max() <= 1
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_decoder_upsamples_in_the_features_dtype_with_the_same_outputs(tiny_model):
    """CUDA autocast would run nearest upsampling in fp32 and drag the concatenation with it; the decoder keeps it in
    bf16 (autocast off around it). The policy is CUDA's, so the test checks the mechanism: every upsampling runs
    outside autocast on bf16 input, and the model computes what smp's own decoder block computes."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from segmentation_models_pytorch.decoders.unetplusplus.decoder import DecoderBlock

    from restore.model import SameDtypeUpsampleBlock

    blocks = [m for m in tiny_model.modules() if isinstance(m, DecoderBlock)]
    assert blocks and all(type(b) is SameDtypeUpsampleBlock for b in blocks)
    seen = []

    class Upsamples(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.upsample_nearest2d:
                seen.append((args[0].dtype, torch.is_autocast_enabled("cpu")))
            return func(*args, **(kwargs or {}))

    gray, mask = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Upsamples():
        tiny_model(gray, mask)
    assert len(seen) == len(blocks)  # each block of both stages once
    assert set(seen) == {(torch.bfloat16, False)}

    # smp's block put back: the same numbers, in fp32 and under bf16 autocast
    original = build_model(TINY).eval()
    original.load_state_dict(tiny_model.state_dict())
    for m in original.modules():
        if type(m) is SameDtypeUpsampleBlock:
            m.__class__ = DecoderBlock
    with torch.no_grad():
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                for ours, theirs in zip(tiny_model(gray, mask), original(gray, mask)):
                    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spec", [TINY, TINY_WIDE], ids=["efficientnet", "resnet"])
def test_cbam_on_deepest_feature_sized_from_encoder(spec):
    model = build_model(spec).eval()
    for stage in (model.inpainter, model.colorizer):
        deepest = stage.net.encoder.out_channels[-1]
        assert isinstance(stage.net.cbam, CBAM)
        assert stage.net.cbam.channel_mlp[0].in_channels == deepest
        assert stage.net.cbam.channel_mlp[0].out_channels == max(1, deepest // spec.cbam_reduction)
        assert stage.net.cbam.spatial_conv.kernel_size == (spec.cbam_kernel, spec.cbam_kernel)
    # The block is in the forward path: changing its weights changes the output.
    gray, mask = _inputs()
    with torch.no_grad():
        before = model.colorize(gray)
        model.colorizer.net.cbam.spatial_conv.weight.add_(1.0)
        after = model.colorize(gray)
    assert not torch.equal(before, after)  # small at random init (tiny deepest features), but not zero


def test_two_encoders_have_different_cbam_widths_and_cbam_can_be_off():
    widths = [build_model(s).inpainter.net.cbam.channel_mlp[0].in_channels for s in (TINY, TINY_WIDE)]
    assert widths[0] != widths[1]
    plain = build_model(dataclasses.replace(TINY, cbam=False))
    assert not any("cbam" in k for k in plain.state_dict())


def test_spec_round_trip_and_validation():
    spec = dataclasses.replace(TINY, color_mode="chroma", encoder_weights="/some/file.safetensors")
    back = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and isinstance(back.decoder_channels, tuple)
    assert ModelSpec().encoder == "efficientnet-b4" and ModelSpec().encoder_weights is None
    with pytest.raises(ValueError, match="unknown ModelSpec keys: bogus, decoder"):
        ModelSpec.from_dict({**spec.to_dict(), "bogus": 1, "decoder": 2})
    with pytest.raises(ValueError, match="color_mode"):
        ModelSpec(color_mode="lab")
    with pytest.raises(ValueError, match="decoder_channels has 3 entries, encoder_depth is 5"):
        ModelSpec(decoder_channels=(8, 8, 8))
    for bad in ("no-such-net", "tu-no_such_net"):
        with pytest.raises(ValueError, match=f"encoder '{bad}' is not an smp encoder name"):
            ModelSpec(encoder=bad)
    with pytest.raises(ValueError, match="cbam must be a bool"):
        ModelSpec(cbam=1)


def test_chroma_mode_keeps_the_restored_luma():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, color_mode="chroma")).eval()
    gray, mask = _inputs(h=40, w=72)
    with torch.no_grad():
        restored, rgb = model(gray, mask)
    assert rgb.shape == (2, 3, 40, 72)
    # fp32 rounding only: the composition is exact in real arithmetic.
    assert (rgb_to_luma(rgb) - restored).abs().max() < 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the composition itself stays in fp32
        restored, rgb = model(gray, mask)
    assert rgb.dtype == torch.float32 and (rgb_to_luma(rgb) - restored).abs().max() < 1e-5


def test_compose_chroma_extreme_chroma_stays_in_gamut_with_exact_luma():
    luma = torch.linspace(0, 1, 101).view(1, 1, 1, 101).expand(1, 1, 4, 101)
    corners = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]).view(1, 4, 2, 1).permute(0, 2, 1, 3)
    chroma = corners.expand(1, 2, 4, 101)
    rgb = compose_chroma(luma, chroma)
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb_to_luma(rgb) - luma).abs().max() < 1e-5
    # Mid luma keeps visible color (the chroma is scaled down, not dropped).
    mid = rgb[0, :, :, 50]
    assert (mid.amax(0) - mid.amin(0)).min() > 0.2


def test_chroma_of_a_photo_with_its_own_luma_gives_the_photo_back():
    from skimage import data as skdata

    from restore.model import rgb_to_chroma

    rgb = torch.from_numpy(skdata.astronaut()[::8, ::8].copy()).permute(2, 0, 1)[None].float() / 255
    back = compose_chroma(rgb_to_luma(rgb), rgb_to_chroma(rgb))
    assert (back - rgb).abs().max() < 1e-5  # in-gamut colors are never desaturated


def _save(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_checkpoint_round_trip_is_bitwise(tiny_model, tmp_path):
    file = _save(inference_checkpoint(tiny_model, TINY), tmp_path / "model.pt")
    loaded, info = load_restorer(file)
    assert not loaded.training and info["weights_used"] == "model" and info["path"] == str(file)
    assert ModelSpec.from_dict(info["model_spec"]) == TINY
    gray, mask = _inputs(h=70, w=45)
    with torch.no_grad():
        a, b = tiny_model(gray, mask)
        c, d = loaded(gray, mask)
    assert torch.equal(a, c) and torch.equal(b, d)


def test_checkpoint_prefers_ema_and_drops_optimizer(tiny_model, tmp_path):
    ckpt = inference_checkpoint(tiny_model)
    ema = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    # As torch.optim.swa_utils.AveragedModel saves it: 'module.' prefixes and a counter.
    ckpt["ema"] = {**{f"module.{k}": v for k, v in ema.items()}, "n_averaged": torch.tensor(3)}
    ckpt["optimizer"] = {"state": {}, "param_groups": []}
    loaded, info = load_restorer(_save(ckpt, tmp_path / "ema.pt"))
    assert info["weights_used"] == "ema" and "optimizer" not in info
    name = "inpainter.net.cbam.spatial_conv.weight"
    assert torch.equal(loaded.state_dict()[name], ema[name])


def test_wrapped_models_save_and_load_plain_keys(tiny_model, tmp_path):
    averaged = torch.optim.swa_utils.AveragedModel(tiny_model)  # as EMA is often kept; its keys are 'module.*'
    compiled = torch.compile(tiny_model)  # wrapping only, nothing is compiled: keys are '_orig_mod.*'
    plain = inference_checkpoint(tiny_model)["model"]
    for wrapped in (averaged, compiled):
        assert list(inference_checkpoint(wrapped)["model"]) == list(plain)
    ckpt = {**inference_checkpoint(tiny_model), "ema": averaged.state_dict()}
    loaded, info = load_restorer(_save(ckpt, tmp_path / "avg.pt"))
    assert info["weights_used"] == "ema"
    assert all(torch.equal(v, plain[k]) for k, v in loaded.state_dict().items())


def test_checkpoint_that_does_not_match_its_spec_names_file_and_keys(tiny_model, tmp_path):
    ckpt = inference_checkpoint(tiny_model)
    ckpt["model_spec"] = dataclasses.replace(TINY, cbam=False).to_dict()
    file = _save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt.*unexpected \d+: inpainter\.net\.cbam\."):
        load_restorer(file)
    ckpt = inference_checkpoint(tiny_model)
    ckpt["model_spec"] = {**TINY.to_dict(), "extra_knob": 1}
    with pytest.raises(ValueError, match=r"spec\.pt.*extra_knob"):
        load_restorer(_save(ckpt, tmp_path / "spec.pt"))
    with pytest.raises(ValueError, match=r"notckpt\.pt.*restore-ckpt/1"):
        load_restorer(_save({"model": {}}, tmp_path / "notckpt.pt"))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_restorer(tmp_path / "nowhere.pt")


def test_resolve_checkpoint_in_a_run_dir(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="run"):
        resolve_checkpoint(run)
    ckdir = run / "checkpoints"
    ckdir.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="neither .*best.pt nor .*latest"):
        resolve_checkpoint(run)
    (ckdir / "latest").write_text("step_00000200.pt\n")
    with pytest.raises(FileNotFoundError, match="step_00000200.pt"):
        resolve_checkpoint(run)
    _save({}, ckdir / "step_00000100.pt")
    _save({}, ckdir / "step_00000200.pt")
    assert resolve_checkpoint(run) == ckdir / "step_00000200.pt"
    assert resolve_checkpoint(ckdir) == ckdir / "step_00000200.pt"
    _save({}, ckdir / "best.pt")
    assert resolve_checkpoint(run) == ckdir / "best.pt"
    assert resolve_checkpoint(ckdir / "step_00000100.pt") == ckdir / "step_00000100.pt"


def test_load_restorer_from_run_dir(tiny_model, tmp_path):
    ckdir = tmp_path / "run" / "checkpoints"
    _save(inference_checkpoint(tiny_model), ckdir / "step_00000010.pt")
    (ckdir / "latest").write_text("step_00000010.pt")
    _, info = load_restorer(tmp_path / "run")
    assert info["path"] == str(ckdir / "step_00000010.pt")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_encoder_weights_are_loaded_into_both_stages(tmp_path, suffix):
    torch.manual_seed(1)
    source = smp.encoders.get_encoder(TINY.encoder, in_channels=3, depth=TINY.encoder_depth, weights=None)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    file = tmp_path / f"enc{suffix}"
    save_file(state, str(file)) if suffix == ".safetensors" else torch.save(state, file)
    model = build_model(dataclasses.replace(TINY, encoder_weights=str(file)))
    first = next(k for k, v in state.items() if v.ndim == 4)  # the stem conv
    for stage, in_ch in ((model.inpainter, 2), (model.colorizer, 1)):
        got = stage.net.encoder.state_dict()
        assert set(got) == set(state)
        for k, v in state.items():
            if k != first:
                assert torch.equal(got[k], v), k
        # smp/timm's adaptation of an RGB stem: 1 channel sums the RGB kernels, 2 channels repeat them scaled 3/2.
        expected = state[first].sum(1, keepdim=True) if in_ch == 1 else state[first][:, :2] * 1.5
        assert torch.allclose(got[first], expected)


def test_local_encoder_weights_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(dataclasses.replace(TINY, encoder_weights=str(tmp_path / "missing.pth")))
    other = smp.encoders.get_encoder(TINY_WIDE.encoder, in_channels=3, depth=5, weights=None).state_dict()
    file = tmp_path / "resnet.pth"
    torch.save(other, file)
    with pytest.raises(ValueError, match=r"resnet\.pth do not match.*missing"):
        build_model(dataclasses.replace(TINY, encoder_weights=str(file)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        build_model(dataclasses.replace(TINY, encoder_weights=str(junk)))


def test_color_size_colorizes_large_images_shrunk_and_keeps_their_full_resolution_luma():
    import torch.nn.functional as F

    torch.manual_seed(0)
    spec = dataclasses.replace(TINY, color_mode="chroma", color_size=32)
    model = build_model(spec).eval()
    full = build_model(dataclasses.replace(spec, color_size=0)).eval()
    full.load_state_dict(model.state_dict())
    gray = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        rgb = model.colorize(gray)
        small = F.interpolate(gray, size=(32, 48), mode="area")
        assert rgb.shape == (1, 3, 64, 96)
        assert torch.allclose(rgb_to_luma(rgb), gray, atol=1e-5)  # the full-resolution luma, not the shrunk one
        # the chroma is the small image's, upsampled
        from restore.model import rgb_to_chroma

        want = F.interpolate(rgb_to_chroma(full.colorize(small)), size=(64, 96), mode="bilinear", align_corners=False)
        assert torch.allclose(compose_chroma(gray, want), rgb, atol=1e-6)
        assert not torch.allclose(rgb, full.colorize(gray), atol=1e-3)
        # at or below the working size nothing changes
        assert torch.equal(model.colorize(small), full.colorize(small))
    assert ModelSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "color_size"}).color_size == 0
    with pytest.raises(ValueError, match="color_size"):
        ModelSpec(color_size=-1)
