"""python convert.py --hf-path REPO_OR_DIR --mlx-path DIR [options]  (same as `mlx_dsv4 convert`)."""

import sys

from mlx_dsv4.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
