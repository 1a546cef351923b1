"""Train liverseg: ``python main.py [--config FILE] [--debug] [key.sub=value ...]``.

In N processes with DistributedDataParallel: ``torchrun --nproc_per_node=N main.py ...`` (the
same arguments; see docs/distributed.md). Each process runs this file; ``fit()`` joins them.
"""

import sys

from liverseg.cli import main

if __name__ == "__main__":
    sys.exit(
        main(
            ["train", *sys.argv[1:]]
            if "--debug" not in sys.argv
            else ["--debug", "train", *[a for a in sys.argv[1:] if a != "--debug"]]
        )
    )
