"""`python -m subtune ...`: the CLI, also as launchers start it (`torchrun --nproc_per_node 2 -m subtune train ...`,
`accelerate launch -m subtune train ...`)."""

import sys

from subtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
