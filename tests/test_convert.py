"""Checkpoint converters (scripts/convert_adm.py, scripts/convert_score_sde.py; ood_bench/convert).

ADM: guided-diffusion's own ``UNetModel`` (the ``guided-diffusion-sdk`` package, a dev dependency) at a tiny width
with random weights is converted and must give the same outputs (all channels, learned sigma included), also
class-conditional. score_sde: no package ships score_sde_pytorch, so a reference forward written here from
``models/ddpm.py``'s equations runs on a state dict laid out as score_sde's (``all_modules.<i>.*``, the
``model``/``ema`` checkpoint entries); docs/checkpoints.md reports a one-off run against the official code.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script

from ood_bench.convert import CheckpointError
from ood_bench.convert import adm as cadm
from ood_bench.convert import score_sde as csde
from ood_bench.models.diffusion import load_pretrained
from ood_bench.samplers.guidance import model_eps, unconditional_eps
from ood_bench.samplers.inpaint import inpaint

TOL = 1e-5


def _model_cfg(folder, size: int) -> dict:
    sched = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
    return {"pretrained": str(folder), "subfolder": None, "sample_size": size, "channels": 3, "scheduler": sched}


# ------------------------------------------------------------------------------------------------------------------
# ADM
# ------------------------------------------------------------------------------------------------------------------


def _adm(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from guided_diffusion.unet import UNetModel
    args = {
        "image_size": 16,
        "in_channels": 3,
        "model_channels": 32,
        "out_channels": 6,
        "num_res_blocks": 1,
        "attention_resolutions": (2, 4),  # ds: levels 1 and 2
        "channel_mult": (1, 2, 2),
        "num_head_channels": 16,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
        **kw,
    }
    torch.manual_seed(0)
    ref = UNetModel(**args).eval()
    with torch.no_grad():  # ADM zero-initialises out and proj_out: random everywhere so every weight matters
        for p in ref.parameters():
            p.normal_(0.0, 0.1)
    return ref


ADM_CASES = {
    "uncond-256-like": {},  # learned sigma, legacy attention order, scale-shift, resblock up/down
    "class-cond-64-like": {"num_classes": 5, "use_new_attention_order": True, "num_res_blocks": 2},
    "plain-resample": {
        "out_channels": 3,
        "use_scale_shift_norm": False,
        "resblock_updown": False,
        "attention_resolutions": (1, 4),
    },
}


@pytest.mark.parametrize("case", list(ADM_CASES))
def test_adm_conversion_equals_guided_diffusion(case, tmp_path):
    pytest.importorskip("guided_diffusion", reason="guided-diffusion-sdk (the dev extra) is not installed")
    kw = ADM_CASES[case]
    ref = _adm(**kw)
    ckpt = tmp_path / "tiny_adm.pt"
    torch.save(ref.state_dict(), ckpt)
    order = "new" if kw.get("use_new_attention_order") else "legacy"
    argv = [str(ckpt), str(tmp_path / "out"), "--image-size", "16", "--num-head-channels", "16"]
    assert load_script("convert_adm").main([*argv, "--attention-order", order]) == 0
    model = load_pretrained(_model_cfg(tmp_path / "out", 16), torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, 4, 2]) if kw.get("num_classes") else None
    with torch.no_grad():
        want = ref(x, t, y)
        got = model.unet(x, t, class_labels=y).sample
    assert got.shape == want.shape == (3, kw.get("out_channels", 6), 16, 16)
    assert (got - want).abs().max().item() <= TOL
    assert want.abs().max().item() > 0.05  # a real comparison, not of two near-zero tensors
    learned = kw.get("out_channels", 6) == 6
    assert model.scheduler_config["variance_type"] == ("learned_range" if learned else "fixed_large")
    if kw.get("num_classes"):
        assert model.num_classes == 5 and not model.has_null_class  # every embedding is a real ImageNet class
        with pytest.raises(ValueError, match="without a null class"):
            unconditional_eps(model, x, 10)
    else:
        with torch.no_grad():  # DiffGuard's noise prediction: the first 3 of the 6 channels
            assert (model_eps(model, x, 417) - ref(x, torch.full((3,), 417))[:, :3]).abs().max() <= TOL


RELEASED_LAYOUTS = {  # the README flags of each release, at model_channels 64 (256 / 192 released)
    "256x256_diffusion_uncond.pt": ({"channel_mult": (1, 1, 2, 2, 4, 4), "attention_resolutions": (8, 16, 32)}, 64),
    "256x256_diffusion.pt": (
        {"channel_mult": (1, 1, 2, 2, 4, 4), "attention_resolutions": (8, 16, 32), "num_classes": 1000},
        64,
    ),
    "64x64_diffusion.pt": (
        {
            "image_size": 64,
            "channel_mult": (1, 2, 3, 4),
            "num_res_blocks": 3,
            "attention_resolutions": (2, 4, 8),
            "num_classes": 1000,
            "use_new_attention_order": True,
        },
        32,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RELEASED_LAYOUTS))
def test_adm_released_layouts_convert_through_their_presets(name, tmp_path):
    """The released files' layouts (6 levels, 64 channels per head, 1000 classes, ...) at a quarter of the width,
    converted through the preset of the file name (docs/checkpoints.md quotes these differences)."""
    pytest.importorskip("guided_diffusion")
    kw, px = RELEASED_LAYOUTS[name]
    args = {"image_size": 256, "model_channels": 64, "num_res_blocks": 2, "num_head_channels": 64, **kw}
    ref = _adm(**args)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    torch.save(ref.state_dict(), tmp_path / name)
    cadm.convert(tmp_path / name, tmp_path / "out")
    model = load_pretrained(_model_cfg(tmp_path / "out", args["image_size"]), torch.device("cpu"))
    x, t = torch.randn(2, 3, px, px), torch.tensor([10, 900])
    y = torch.tensor([3, 999]) if kw.get("num_classes") else None
    with torch.no_grad():
        want, got = ref(x, t, y), model.unet(x, t, class_labels=y).sample
    assert (got - want).abs().max().item() <= TOL
    assert model.unet.config.attention_head_dim == 64 and len(model.unet.config.block_out_channels) == len(
        kw["channel_mult"]
    )


def test_adm_wrong_attention_order_is_detected_by_the_comparison():
    """The parity test can fail: the other qkv layout changes the outputs far beyond the tolerance."""
    pytest.importorskip("guided_diffusion")
    ref = _adm()
    sd = ref.state_dict()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    wrong = cadm.convert_state_dict(sd, cadm.infer_arch(sd, 16, num_head_channels=16, attention_order="new"))
    with torch.no_grad():
        assert (wrong(x, t).sample - ref(x, t)).abs().max() > 100 * TOL


def test_adm_learned_sigma_drives_the_ddpm_step_as_guided_diffusion():
    """diffusers' learned-range DDPM step (the converted scheduler) has ADM's p_sample mean and variance.

    diffusers keeps the schedule in float32, ADM in float64: 1 - abar near t = 0 loses digits, so the mean of the
    last few steps differs by up to ~3e-4 (measured: 2.0e-4 at t = 1, 2.9e-4 at t = 2, 4.8e-5 at t = 10,
    <= 5e-7 from t = 300); the standard deviation agrees to 1.3e-4 (relative) everywhere.
    """
    pytest.importorskip("guided_diffusion")
    from diffusers import DDPMScheduler
    from guided_diffusion.script_util import create_gaussian_diffusion

    ref = _adm()
    sd = ref.state_dict()
    arch = cadm.infer_arch(sd, 16, num_head_channels=16)
    unet = cadm.convert_state_dict(sd, arch)
    sched = DDPMScheduler.from_config(cadm.scheduler(arch).config, clip_sample=False)
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for t in (1, 10, 300, 999):
        with torch.no_grad():
            out = diffusion.p_mean_variance(ref, x, torch.full((2,), t), clip_denoised=False)
            model_out = unet(x, torch.full((2,), t)).sample
        log_var = sched._get_variance(t, predicted_variance=model_out[:, 3:])
        assert ((0.5 * (log_var - out["log_variance"])).exp() - 1).abs().max() <= 2e-4, t
        step = sched.step(model_out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        mean = step - (0.5 * log_var).exp() * noise
        assert (mean - out["mean"]).abs().max() <= (1e-5 if t >= 300 else 1e-3), t
        if t <= 10:  # the variance channels matter (where beta and beta-tilde differ): fixed-small is far off
            fixed_small = torch.log(torch.as_tensor(diffusion.posterior_variance[t]))
            assert (log_var - fixed_small).abs().max() > 0.05


def test_learned_sigma_model_runs_lmd_inpainting_with_both_samplers(tmp_path):
    """LMD's sampler reads epsilon from the first C channels (DDIM) or hands all 2C to the learned-range DDPM step."""
    pytest.importorskip("guided_diffusion")
    ref = _adm()
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    cadm.convert(tmp_path / "m.pt", tmp_path / "out", image_size=16, num_head_channels=16)
    model = load_pretrained(_model_cfg(tmp_path / "out", 16), torch.device("cpu"))
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    for sampler in ("ddim", "ddpm"):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        out = inpaint(model, x0, mask, gens, sampler=sampler, steps=3, clip=False)
        assert out.shape == x0.shape and torch.isfinite(out).all()
        assert torch.equal(out[..., :8], x0[..., :8])


def test_adm_bad_checkpoints_get_clear_errors(tmp_path):
    pytest.importorskip("guided_diffusion")
    sd = _adm().state_dict()
    with pytest.raises(CheckpointError, match=r"lacks keys .*middle_block\.1\.qkv\.weight"):
        broken = {k: v for k, v in sd.items() if k != "middle_block.1.qkv.weight"}
        cadm.convert_state_dict(broken, cadm.infer_arch(broken, 16, num_head_channels=16))
    with pytest.raises(CheckpointError, match="convert_score_sde"):
        cadm.infer_arch({"model": {}, "ema": {}, "step": 1}, 16)
    with pytest.raises(CheckpointError, match="classifier"):
        cadm.infer_arch({k: v for k, v in sd.items() if not k.startswith("output_blocks")}, 16)
    with pytest.raises(CheckpointError, match="not multiples of num_head_channels=24"):
        cadm.infer_arch(sd, 16, num_head_channels=24)
    with pytest.raises(CheckpointError, match="one attention_head_dim"):  # the 128x128 release's situation
        cadm.infer_arch(_adm(channel_mult=(1, 1, 2)).state_dict(), 16, num_head_channels=None, num_heads=2)
    with pytest.raises(CheckpointError, match="num_heads=4"):
        cadm.preset_for("128x128_diffusion.pt")
    with pytest.raises(CheckpointError, match="channel_mult starts at 0.5"):
        cadm.preset_for("/x/512x512_diffusion.pt")
    torch.save(sd, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match="--image-size"):
        cadm.convert(tmp_path / "custom.pt", tmp_path / "o")
    assert cadm.preset_for("256x256_diffusion_uncond.pt")["num_head_channels"] == 64


def test_adm_cli_reports_errors_and_keeps_existing_output(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert load_script("convert_adm").main([str(tmp_path / "x.pt"), str(tmp_path / "o"), "--image-size", "16"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    out = tmp_path / "exists"
    out.mkdir()
    pytest.importorskip("guided_diffusion")
    torch.save(_adm().state_dict(), tmp_path / "m.pt")
    argv = [str(tmp_path / "m.pt"), str(out), "--image-size", "16", "--num-head-channels", "16"]
    assert load_script("convert_adm").main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert load_script("convert_adm").main([*argv, "--overwrite"]) == 0
    assert (out / "unet" / "config.json").is_file() and (out / "conversion.json").is_file()


# ------------------------------------------------------------------------------------------------------------------
# score_sde ddpm
# ------------------------------------------------------------------------------------------------------------------

SDE_TINY = {"nf": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8, 4), "image_size": 8}


def _sde_state_dict(nf, ch_mult, num_res_blocks, attn_resolutions, image_size, channels=3, seed=0):
    """Random weights laid out as score_sde's DDPM state dict (``all_modules.<i>.*``, parameters() order)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    idx = 0

    def add(**shapes):
        nonlocal idx
        for name, shape in shapes.items():
            sd[f"all_modules.{idx}.{name}"] = torch.randn(shape, generator=g) * 0.1
        idx += 1

    def resnet(cin, cout):
        shapes = {
            "GroupNorm_0.weight": (cin,),
            "GroupNorm_0.bias": (cin,),
            "Conv_0.weight": (cout, cin, 3, 3),
            "Conv_0.bias": (cout,),
            "Dense_0.weight": (cout, 4 * nf),
            "Dense_0.bias": (cout,),
            "GroupNorm_1.weight": (cout,),
            "GroupNorm_1.bias": (cout,),
            "Conv_1.weight": (cout, cout, 3, 3),
            "Conv_1.bias": (cout,),
        }
        if cin != cout:
            shapes.update({"NIN_0.W": (cin, cout), "NIN_0.b": (cout,)})
        add(**shapes)

    def attn(c):
        shapes = {"GroupNorm_0.weight": (c,), "GroupNorm_0.bias": (c,)}
        for k in range(4):
            shapes.update({f"NIN_{k}.W": (c, c), f"NIN_{k}.b": (c,)})
        add(**shapes)

    add(weight=(4 * nf, nf), bias=(4 * nf,))
    add(weight=(4 * nf, 4 * nf), bias=(4 * nf,))
    add(weight=(nf, channels, 3, 3), bias=(nf,))
    hs, ch, levels = [nf], nf, len(ch_mult)
    for i in range(levels):
        for _ in range(num_res_blocks):
            resnet(ch, nf * ch_mult[i])
            ch = nf * ch_mult[i]
            if image_size // 2**i in attn_resolutions:
                attn(ch)
            hs.append(ch)
        if i != levels - 1:
            add(**{"Conv_0.weight": (ch, ch, 3, 3), "Conv_0.bias": (ch,)})
            hs.append(ch)
    resnet(ch, ch)
    attn(ch)
    resnet(ch, ch)
    for i in reversed(range(levels)):
        for _ in range(num_res_blocks + 1):
            resnet(ch + hs.pop(), nf * ch_mult[i])
            ch = nf * ch_mult[i]
        if image_size // 2**i in attn_resolutions:
            attn(ch)
        if i != 0:
            add(**{"Conv_0.weight": (ch, ch, 3, 3), "Conv_0.bias": (ch,)})
    add(weight=(ch,), bias=(ch,))
    add(weight=(channels, ch, 3, 3), bias=(channels,))
    return sd


def _sde_reference(sd, x, labels, nf, ch_mult, num_res_blocks, attn_resolutions, image_size):
    """score_sde ``models/ddpm.py`` DDPM.forward (centered, conditional, no sigma scaling) from its equations."""
    m = 0

    def p(name):
        return sd[f"all_modules.{m}.{name}"]

    def gn(h, prefix):
        return F.group_norm(h, 32, p(f"{prefix}.weight"), p(f"{prefix}.bias"), eps=1e-6)

    def nin(h, k):  # x.permute(0,2,3,1) @ W + b
        return torch.einsum("bchw,co->bohw", h, p(f"NIN_{k}.W")) + p(f"NIN_{k}.b")[None, :, None, None]

    def resnet(h, temb):
        out = F.conv2d(F.silu(gn(h, "GroupNorm_0")), p("Conv_0.weight"), p("Conv_0.bias"), padding=1)
        out = out + F.linear(F.silu(temb), p("Dense_0.weight"), p("Dense_0.bias"))[:, :, None, None]
        out = F.conv2d(F.silu(gn(out, "GroupNorm_1")), p("Conv_1.weight"), p("Conv_1.bias"), padding=1)
        if f"all_modules.{m}.NIN_0.W" in sd:
            h = nin(h, 0)
        return h + out

    def attn(h):
        b, c, hh, ww = h.shape
        n = gn(h, "GroupNorm_0")
        q, k, v = nin(n, 0), nin(n, 1), nin(n, 2)
        w = torch.einsum("bchw,bcij->bhwij", q, k) * c**-0.5
        w = torch.softmax(w.reshape(b, hh, ww, hh * ww), dim=-1).reshape(b, hh, ww, hh, ww)
        return h + nin(torch.einsum("bhwij,bcij->bchw", w, v), 3)

    half = nf // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    temb = labels.float()[:, None] * freqs[None]
    temb = torch.cat([torch.sin(temb), torch.cos(temb)], dim=1)
    temb = F.linear(temb, p("weight"), p("bias"))
    m += 1
    temb = F.linear(F.silu(temb), p("weight"), p("bias"))
    m += 1
    hs = [F.conv2d(x, p("weight"), p("bias"), padding=1)]
    m += 1
    for i in range(len(ch_mult)):
        for _ in range(num_res_blocks):
            h = resnet(hs[-1], temb)
            m += 1
            if h.shape[-1] in attn_resolutions:
                h = attn(h)
                m += 1
            hs.append(h)
        if i != len(ch_mult) - 1:
            hs.append(F.conv2d(F.pad(hs[-1], (0, 1, 0, 1)), p("Conv_0.weight"), p("Conv_0.bias"), stride=2))
            m += 1
    h = resnet(hs[-1], temb)
    m += 1
    h = attn(h)
    m += 1
    h = resnet(h, temb)
    m += 1
    for i in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            h = resnet(torch.cat([h, hs.pop()], dim=1), temb)
            m += 1
        if h.shape[-1] in attn_resolutions:
            h = attn(h)
            m += 1
        if i != 0:
            h = F.conv2d(
                F.interpolate(h, scale_factor=2, mode="nearest"), p("Conv_0.weight"), p("Conv_0.bias"), padding=1
            )
            m += 1
    h = F.silu(F.group_norm(h, 32, p("weight"), p("bias"), eps=1e-6))
    m += 1
    out = F.conv2d(h, p("weight"), p("bias"), padding=1)
    assert f"all_modules.{m + 1}.weight" not in sd
    return out


def _sde_checkpoint(arch_kw, ema_seed=1):
    raw = _sde_state_dict(**arch_kw)
    ema = _sde_state_dict(**arch_kw, seed=ema_seed)
    model = {"module.sigmas": torch.linspace(1, 0.01, 1000), **{f"module.{k}": v for k, v in raw.items()}}
    ckpt = {"model": model, "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": list(ema.values())}}
    return {**ckpt, "optimizer": {}, "step": 26}, raw, ema


@pytest.mark.parametrize(
    "arch_kw",
    [SDE_TINY, {"nf": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 2, "attn_resolutions": (8,), "image_size": 16}],
    ids=["attn-every-level", "lmd-like-layout"],
)
def test_score_sde_conversion_equals_the_reference_forward(arch_kw, tmp_path):
    ckpt, raw, ema = _sde_checkpoint(arch_kw)
    torch.save(ckpt, tmp_path / "checkpoint_26.pth")
    size = arch_kw["image_size"]
    argv = [str(tmp_path / "checkpoint_26.pth"), str(tmp_path / "out"), "--image-size", str(size)]
    argv += ["--nf", str(arch_kw["nf"]), "--ch-mult", ",".join(map(str, arch_kw["ch_mult"]))]
    argv += ["--num-res-blocks", str(arch_kw["num_res_blocks"])]
    argv += ["--attn-resolutions", ",".join(map(str, arch_kw["attn_resolutions"]))]
    assert load_script("convert_score_sde").main(argv) == 0
    model = load_pretrained(_model_cfg(tmp_path / "out", size), torch.device("cpu"))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0.999, 517.3, 999.0])  # continuous labels 999 t
    with torch.no_grad():
        got = model.unet(x, labels).sample
        want = _sde_reference(ema, x, labels, **arch_kw)  # EMA weights, as LMD samples
        raw_out = _sde_reference(raw, x, labels, **arch_kw)
    assert (got - want).abs().max().item() <= TOL
    assert (got - raw_out).abs().max().item() > 100 * TOL  # the EMA, not the raw weights, was converted
    cfg = model.unet.config
    assert cfg["_score_sde"]["sde"] == "subvpsde" and cfg["_score_sde"]["time_label"] == "999 * t"
    betas = model.ddpm().betas.float()
    assert torch.allclose(betas, torch.linspace(0.1 / 1000, 20 / 1000, 1000), atol=1e-9)  # VPSDE.discrete_betas


def test_score_sde_raw_weights_and_subvp_warning(tmp_path, caplog):
    ckpt, raw, _ = _sde_checkpoint(SDE_TINY)
    sd, meta = csde.extract_weights(ckpt, "model", "mem")
    assert meta["step"] == 26 and set(sd) == set(raw)
    unet = csde.convert_state_dict(sd, csde.DDPMArch(**SDE_TINY))
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 900.0])
    with torch.no_grad():
        assert (unet(x, labels).sample - _sde_reference(raw, x, labels, **SDE_TINY)).abs().max() <= TOL
    torch.save(ckpt, tmp_path / "c.pth")
    csde.convert(tmp_path / "c.pth", tmp_path / "out", csde.DDPMArch(**SDE_TINY))
    with caplog.at_level("WARNING"):
        load_pretrained(_model_cfg(tmp_path / "out", 8), torch.device("cpu"))
    assert "subVP-SDE" in caplog.text


def test_score_sde_bad_checkpoints_name_the_problem(tmp_path):
    arch = csde.DDPMArch(**SDE_TINY)
    ckpt, raw, _ = _sde_checkpoint(SDE_TINY)
    missing = {k: v for k, v in raw.items() if k != "all_modules.4.NIN_2.W"}
    with pytest.raises(CheckpointError, match=r"lacks keys all_modules\.4\.NIN_2\.W"):
        csde.convert_state_dict(missing, arch)
    with pytest.raises(CheckpointError, match=r"does not use: all_modules\.99\.W"):
        csde.convert_state_dict({**raw, "all_modules.99.W": torch.zeros(1)}, arch)
    bad = dict(raw)
    bad["all_modules.3.Conv_0.weight"] = torch.zeros(16, 32, 3, 3)
    with pytest.raises(CheckpointError, match=r"all_modules\.3\.Conv_0\.weight \(16, 32, 3, 3\)"):
        csde.convert_state_dict(bad, arch)
    with pytest.raises(CheckpointError, match="convert_adm"):
        csde.extract_weights({"input_blocks.0.0.weight": torch.zeros(1)}, "ema", "adm.pt")
    short = {**ckpt, "ema": {**ckpt["ema"], "shadow_params": ckpt["ema"]["shadow_params"][:-1]}}
    with pytest.raises(CheckpointError, match="EMA holds"):
        csde.extract_weights(short, "ema", "c.pth")
    with pytest.raises(CheckpointError, match="--weights model"):
        csde.extract_weights({k: v for k, v in ckpt.items() if k != "ema"}, "ema", "c.pth")
    with pytest.raises(CheckpointError, match="centered"):
        csde.DDPMArch(centered=False).check()
    with pytest.raises(CheckpointError, match="valid"):
        csde.DDPMArch(sde="vesde").check()
    with pytest.raises(CheckpointError, match="ncsnpp"):
        csde.extract_weights(
            {"model": {"module.sigmas": torch.zeros(2), "module.foo.weight": torch.zeros(1)}}, "ema", "x"
        )


def test_score_sde_pickled_objects_need_allow_pickle(tmp_path):
    """torch.load refuses pickled objects (a config namespace here) unless the user vouches for the file."""
    import argparse

    ckpt, _, _ = _sde_checkpoint(SDE_TINY)
    torch.save({**ckpt, "config": argparse.Namespace(nf=32)}, tmp_path / "c.pth")
    arch = csde.DDPMArch(**SDE_TINY)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        csde.convert(tmp_path / "c.pth", tmp_path / "out", arch)
    assert not (tmp_path / "out").exists()
    csde.convert(tmp_path / "c.pth", tmp_path / "out", arch, allow_pickle=True)
    assert (tmp_path / "out" / "unet" / "config.json").is_file()
