"""Train liverseg: ``python main.py [--config FILE] [--debug] [key.sub=value ...]``."""

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
