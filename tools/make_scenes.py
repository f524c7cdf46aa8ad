"""Write Fashion-MNIST scenes (images, COCO boxes/masks, semantic label maps) for detection and segmentation.

    python tools/make_scenes.py --out data/scenes --train 2000 --val 500 --size 256

Garments from Debian's ``dataset-fashion-mnist`` (train split -> training scenes, test split -> validation
scenes) are pasted onto varied canvases; see ``engine/scenes.py`` for the layout and ground truth. The same
options and seed give the same files; a second run with the same options does nothing.
Exit codes: 0 done, 2 bad options or missing source files.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from engine.scenes import DEFAULT_SOURCE, SceneError, make_scenes
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output root (gets images/, semantic/, annotations/)")
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--val", type=int, default=500, help="validation scenes")
    parser.add_argument("--size", type=int, default=256, help="canvas height and width (pixels)")
    parser.add_argument("--min_items", type=int, default=1)
    parser.add_argument("--max_items", type=int, default=6)
    parser.add_argument("--min_frac", type=float, default=0.12, help="smallest item side / canvas side")
    parser.add_argument("--max_frac", type=float, default=0.4, help="largest item side / canvas side")
    parser.add_argument("--max_occlusion", type=float, default=0.3,
                        help="largest fraction of an item's visible pixels a later item may cover")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="folder with the Fashion-MNIST IDX .gz files")
    args = parser.parse_args(argv)
    try:
        make_scenes(args.out, args.train, args.val, args.seed, args.source, size=args.size,
                    min_items=args.min_items, max_items=args.max_items, min_frac=args.min_frac,
                    max_frac=args.max_frac, max_occlusion=args.max_occlusion)
    except SceneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
