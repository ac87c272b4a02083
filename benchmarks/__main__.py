"""`python -m benchmarks` is `jitney bench`."""
import sys

from .bench import main

sys.exit(main())
