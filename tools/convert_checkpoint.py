"""Same as the `illada-convert` command: `python tools/convert_checkpoint.py hf-to-orbax SRC DST`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from illada_jax.cli.convert import main  # noqa: E402

if __name__ == '__main__':
  sys.exit(main())
