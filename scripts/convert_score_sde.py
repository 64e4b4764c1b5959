"""Convert a score_sde_pytorch ``ddpm`` checkpoint (LMD's CIFAR-10 model) into a diffusers UNet2DModel folder.

    python scripts/convert_score_sde.py checkpoint_26.pth $OOD_BENCH_WEIGHTS/score_sde_cifar10_subvp
    python run.py method=lmd data=cifar10_cifar100 model.pretrained=$OOD_BENCH_WEIGHTS/score_sde_cifar10_subvp

The defaults are the checkpoint's config (configs/subvp/cifar10_ddpm_continuous.py: nf 128, ch_mult 1,2,2,2,
2 res blocks, attention at 16 px, centered data, subVP-SDE with beta 0.1 -> 20, continuous time) and its EMA
weights. The network equals score_sde's to float rounding; its time input is the label 999 t and its output the
SDE's noise (score = -output / std(t)). A subVP model does NOT share the marginals of the discrete VP schedule the
suite's DDPM/DDIM samplers use (docs/deviations.md L1; docs/checkpoints.md).
"""

from __future__ import annotations

import sys

from ood_bench.convert.common import converter_parser, run_converter
from ood_bench.convert.score_sde import SDES, WEIGHTS, DDPMArch, convert


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    d = DDPMArch()
    p = converter_parser(__doc__, "score_sde_pytorch checkpoint (.pth: model, ema, optimizer, step)")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA weights (as LMD samples) or raw ones")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--num-channels", type=int, default=d.num_channels)
    p.add_argument("--nf", type=int, default=d.nf)
    p.add_argument("--ch-mult", type=_ints, default=d.ch_mult, help="comma-separated, e.g. 1,2,2,2")
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks)
    p.add_argument("--attn-resolutions", type=_ints, default=d.attn_resolutions, help="comma-separated, e.g. 16")
    p.add_argument("--sde", choices=SDES, default=d.sde)
    p.add_argument("--discrete", action="store_true", help="discrete-time VP training (labels = integer steps)")
    p.add_argument("--uncentered", action="store_true", help="data.centered=False (refused: see the docs)")
    p.add_argument("--beta-min", type=float, default=d.beta_min)
    p.add_argument("--beta-max", type=float, default=d.beta_max)
    p.add_argument("--num-scales", type=int, default=d.num_scales)
    args = p.parse_args(argv)
    arch = DDPMArch(
        image_size=args.image_size,
        num_channels=args.num_channels,
        nf=args.nf,
        ch_mult=args.ch_mult,
        num_res_blocks=args.num_res_blocks,
        attn_resolutions=args.attn_resolutions,
        centered=not args.uncentered,
        sde=args.sde,
        continuous=not args.discrete,
        beta_min=args.beta_min,
        beta_max=args.beta_max,
        num_scales=args.num_scales,
    )
    return run_converter(
        lambda: convert(
            args.checkpoint,
            args.out,
            arch,
            weights=args.weights,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
