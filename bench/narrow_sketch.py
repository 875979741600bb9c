"""Derive a narrower (or sketch-only) influence store from a built one, for benches of sketch widths.

The sketch's projection R (m x 2d) has independent N(0, 1/m) entries and the signs rho (P, m)
are independent draws, so the first m' rows of R, rescaled by sqrt(m / m'), with the first m'
signs, are a sketch of width m' (the same distribution as a build with --influence-sketch m');
a document's sketch, linear in R, becomes its first m' coordinates times sqrt(m / m'). Every
other array is copied unchanged. ``--sketch-only`` also leaves out the position arrays: the
store ``prism index --influence-store sketch`` writes (the same pass computes the same sketches
and self-influence either way; tests/attribution/test_influence.py checks it). Writes BUNDLE_OUT
(a copy of BUNDLE without its influence store) with the derived store; the header records the
width and where it came from.

    python bench/narrow_sketch.py BUNDLE BUNDLE_OUT --width 512 [--sketch-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=None, help="default: the store's own")
    parser.add_argument("--sketch-only", action="store_true", help="leave out the position arrays")
    args = parser.parse_args()

    from safetensors import safe_open
    from safetensors.numpy import save_file

    from core.attribution.influence.query import INFLUENCE_FILE
    from core.attribution.influence.store import ROW_ARRAYS
    from core.index.format import index_dir

    positions = {*ROW_ARRAYS, *(f"{n}_scale" for n in ROW_ARRAYS), "active", "char_start", "char_end"}
    positions |= {"document_blocks", "document_blocks_scale"}

    source = index_dir(args.bundle) / INFLUENCE_FILE
    with safe_open(str(source), framework="numpy") as f:
        header = f.metadata()
        meta = json.loads(header["meta"])
        width = int(meta["sketch_width"])
        args.width = args.width or width
        if not 8 <= args.width <= width:
            raise SystemExit(f"--width must be from 8 to the store's {width}")
        scale = np.float32((width / args.width) ** 0.5)
        arrays = {}
        for name in f.keys():
            if args.sketch_only and name in positions:
                continue
            value = f.get_tensor(name)
            if name == "sketch_projection":
                value = value[: args.width] * scale
            elif name == "sketch_signs":
                value = value[:, : args.width]
            elif name == "document_sketch":
                value = value[:, : args.width] * scale
            arrays[name] = np.ascontiguousarray(value)
    meta["sketch_width"] = args.width
    meta["arguments"]["sketch_width"] = args.width
    meta["derived_from"] = f"the first {args.width} of {width} sketch coordinates of {source} (bench/narrow_sketch.py)"
    if args.sketch_only:
        meta.update(store="sketch", position_bytes=0, document_blocks=False)
        meta["arguments"]["store"] = "sketch"
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(args.bundle, out, ignore=shutil.ignore_patterns(INFLUENCE_FILE))
    save_file(arrays, str(index_dir(out) / INFLUENCE_FILE), metadata={**header, "meta": json.dumps(meta)})
    size = (index_dir(out) / INFLUENCE_FILE).stat().st_size
    kind = "sketch-only" if args.sketch_only else "position"
    print(f"{out}: {kind} store, sketch width {args.width} (from {width}), {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
