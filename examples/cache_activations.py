"""The single-layer script: `python examples/cache_activations.py --prompt 50-50 --layer 10`.

It shares `sweep_layers.py`'s cached generations, so running it for layer 10, then 11, then 12
generates the completions once.
"""

from __future__ import annotations

import logging
import sys

from sweep_layers import parser, sweep


def main(argv=None) -> int:
    args = parser(one_layer=True).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    sweep(args, [args.layer])
    return 0


if __name__ == "__main__":
    sys.exit(main())
