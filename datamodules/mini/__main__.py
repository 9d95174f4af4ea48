"""Write a mini dataset in a benchmark's official layout:
``python -m datamodules.mini {mvtec,adbench,ms1m,ucf101,gldv2,revisited,davis,youtube_vos,vos_images,mot17} OUT``."""

import argparse
from collections.abc import Sequence
from pathlib import Path

from datamodules.mini import adbench, davis, landmarks, ms1m, mot17, mvtec, ucf101


def _summary(root: Path) -> str:
    """One line per top-level folder of ``root`` with its number of files, then its top-level files."""
    lines = [f"wrote {root.resolve()}"]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        lines.append(f"  {folder.name}: {sum(1 for p in folder.rglob('*') if p.is_file())} files")
    files = sorted(p.name for p in root.iterdir() if p.is_file())
    if files:
        lines.append(f"  files: {' '.join(files)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.mini", description=__doc__)
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)

    parser_mvtec = benchmarks.add_parser("mvtec", help="mini MVTec AD (synthetic textures)")
    parser_mvtec.add_argument("out", type=Path)
    parser_mvtec.add_argument(
        "--categories", nargs="+", choices=sorted(mvtec.CATEGORIES), default=list(mvtec.DEFAULT_CATEGORIES)
    )
    parser_mvtec.add_argument("--seed", type=int, default=0)
    parser_mvtec.add_argument("--image-size", type=int, default=128)
    parser_mvtec.set_defaults(
        write=lambda args: mvtec.write_mvtec(args.out, args.categories, args.seed, args.image_size)
    )

    parser_adbench = benchmarks.add_parser("adbench", help="mini ADBench features of an MVTec category (synthetic)")
    parser_adbench.add_argument("out", type=Path)
    parser_adbench.add_argument("--category", default="weave")
    parser_adbench.add_argument("--seed", type=int, default=0)
    parser_adbench.set_defaults(write=lambda args: adbench.write_adbench(args.out, args.category, args.seed).parent.parent)

    parser_ms1m = benchmarks.add_parser("ms1m", help="mini MS1M + verification .bin sets (synthetic faces)")
    parser_ms1m.add_argument("out", type=Path)
    parser_ms1m.add_argument("--seed", type=int, default=0)
    parser_ms1m.add_argument("--identities", type=int, default=64, help="number of training identities")
    parser_ms1m.set_defaults(
        write=lambda args: ms1m.write_ms1m(args.out, num_identities=args.identities, seed=args.seed)
    )

    parser_revisited = benchmarks.add_parser("revisited", help="mini ROxford5k / RParis6k + R1M distractors")
    parser_revisited.add_argument("out", type=Path)
    parser_revisited.add_argument("--seed", type=int, default=0)
    parser_revisited.add_argument("--dataset", choices=["roxford5k", "rparis6k"], default="roxford5k")
    parser_revisited.set_defaults(write=lambda args: landmarks.write_revisited(args.out, seed=args.seed, dataset=args.dataset))

    # The writers that take only the output folder and a seed.
    simple = {
        "ucf101": ("mini UCF101 (synthetic moving shapes, .avi)", ucf101.write_ucf101),
        "gldv2": ("mini GLDv2 (synthetic landmarks, CSV files, hashed tree)", landmarks.write_gldv2),
        "davis": ("mini DAVIS 2017 layout (synthetic textured objects moving) with each frame's flow", davis.write_davis),
        "youtube_vos": ("mini YouTube-VOS train/ (annotated every 5th frame)", davis.write_youtube_vos),
        "vos_images": ("mini images/ + masks/ folder (STM's static-image stage)", davis.write_image_masks),
        "mot17": ("mini MOT17 (textured walkers, MOTChallenge layout)", mot17.write_mot17),
    }
    for name, (help_text, writer) in simple.items():
        sub = benchmarks.add_parser(name, help=help_text)
        sub.add_argument("out", type=Path)
        sub.add_argument("--seed", type=int, default=0)
        sub.set_defaults(write=lambda args, writer=writer: writer(args.out, seed=args.seed))

    args = parser.parse_args(argv)
    print(_summary(args.write(args)))


if __name__ == "__main__":
    main()
