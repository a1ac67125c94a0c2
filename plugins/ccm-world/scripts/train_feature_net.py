"""Train the world's FID feature network: python plugins/ccm-world/scripts/train_feature_net.py [OUT] [--steps N].

A SmallFeatureNet learns to predict each scene's attributes (which shapes, colours, sizes and
background it shows: ccm_world.ATTRIBUTE_NAMES); eval configs then use it with
``features: {kind: feature-net, path: OUT}``. Training and held-out scenes come from seed 0,
the scenes eval configs draw from seed 1.
"""

from __future__ import annotations

import argparse

from ccm_sdk.eval.feature_net import train_feature_net
from ccm_world import ATTRIBUTE_NAMES, WorldDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="outputs/world/feature-net")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--length", type=int, default=50_000)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader processes rendering scenes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    data = WorldDataset(size=args.size, length=args.length, seed=0, conditions=())

    def log(entry):
        if entry["step"] % 100 == 0:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}")

    result = train_feature_net(data, steps=args.steps, batch_size=args.batch_size, label_names=ATTRIBUTE_NAMES,
                               num_workers=args.num_workers, device=args.device, output_dir=args.out, log=log)  # fmt: skip
    print(f"held-out attribute accuracy {result.accuracy:.4f}; saved to {args.out}")


if __name__ == "__main__":
    main()
