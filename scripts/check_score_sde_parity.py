"""Compare the score_sde converter with score_sde_pytorch's own ``ddpm`` model (a local clone, not shipped here).

    git clone https://github.com/yang-song/score_sde_pytorch /tmp/score_sde_pytorch   # on a machine with internet
    python scripts/check_score_sde_parity.py /tmp/score_sde_pytorch

Builds the official ``models.ddpm.DDPM`` (wrapped in ``DataParallel`` as score_sde trains it) with random weights,
an ``ExponentialMovingAverage`` whose shadow differs from the raw weights, saves them as ``save_checkpoint`` does
(``model``, ``ema``, ``optimizer``, ``step``), converts with ``--weights model`` and ``ema``, and prints the largest
output difference at labels 0.5 and 998.9 for a tiny layout and for LMD's CIFAR-10 model (nf 128). The numbers are
in docs/checkpoints.md. Needs only torch and numpy besides the clone (its models/ddpm.py imports no TF/JAX).
"""

from __future__ import annotations

import argparse
import io
import sys
import types

import torch

from ood_bench.convert.score_sde import DDPMArch, convert_state_dict, extract_weights

LAYOUTS = [  # (nf, ch_mult, num_res_blocks, attn_resolutions, image_size)
    (32, (1, 2, 2, 2), 2, (16,), 32),
    (32, (1, 2), 1, (8, 4), 8),
    (128, (1, 2, 2, 2), 2, (16,), 32),  # LMD's CIFAR-10 model
]


def _config(nf: int, ch_mult: tuple[int, ...], nrb: int, attn: tuple[int, ...], size: int) -> types.SimpleNamespace:
    ns = types.SimpleNamespace
    model = ns(
        nonlinearity="swish",
        nf=nf,
        ch_mult=ch_mult,
        num_res_blocks=nrb,
        attn_resolutions=attn,
        dropout=0.1,
        resamp_with_conv=True,
        conditional=True,
        scale_by_sigma=False,
        sigma_max=50,
        sigma_min=0.01,
        num_scales=1000,
        name="ddpm",
    )
    return ns(model=model, data=ns(image_size=size, centered=True, num_channels=3))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", help="a clone of yang-song/score_sde_pytorch")
    args = p.parse_args(argv)
    sys.path.insert(0, args.repo)
    from models import ddpm as official  # noqa: PLC0415 - the clone is only on the path from here on
    from models.ema import ExponentialMovingAverage  # noqa: PLC0415

    torch.manual_seed(0)
    print("layout | weights | max abs. difference | largest output | parameters (official / converted)")
    for nf, mult, nrb, attn, size in LAYOUTS:
        ref = torch.nn.DataParallel(official.DDPM(_config(nf, mult, nrb, attn, size))).eval()
        with torch.no_grad():
            for prm in ref.parameters():
                prm.normal_(0, 0.05)
        ema = ExponentialMovingAverage(ref.parameters(), decay=0.9999)
        with torch.no_grad():
            for prm in ref.parameters():
                prm.add_(torch.randn_like(prm) * 0.05)
        buf = io.BytesIO()
        torch.save({"model": ref.state_dict(), "ema": ema.state_dict(), "optimizer": {}, "step": 7}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        arch = DDPMArch(image_size=size, nf=nf, ch_mult=mult, num_res_blocks=nrb, attn_resolutions=attn)
        x, labels = torch.randn(2, 3, size, size), torch.tensor([0.5, 998.9])
        for which in ("model", "ema"):
            unet = convert_state_dict(extract_weights(ckpt, which, "in-memory")[0], arch)
            if which == "ema":
                ema.copy_to(ref.parameters())
            with torch.no_grad():
                want, got = ref(x, labels), unet(x, labels).sample
            n_ref = sum(q.numel() for q in ref.parameters())
            n_got = sum(q.numel() for q in unet.parameters())
            print(
                f"nf {nf}, ch_mult {mult}, {nrb} blocks, attention {attn}, {size} px | {which} | "
                f"{(want - got).abs().max().item():.1e} | {want.abs().max().item():.2f} | {n_ref:,} / {n_got:,}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
