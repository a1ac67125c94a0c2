"""Write the world's sample sheet: python plugins/ccm-world/scripts/make_sample_grid.py [OUT] [--rows N] [--seed S]."""

from __future__ import annotations

import argparse

from ccm_world.grid import save_sample_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="docs/images/world_samples.png")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = save_sample_grid(args.out, rows=args.rows, size=args.size, seed=args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
