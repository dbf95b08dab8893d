"""`python -m kolors`, and so `torchrun --nproc-per-node N -m kolors train-lora ...`."""

import sys

from kolors.cli import main

sys.exit(main())
