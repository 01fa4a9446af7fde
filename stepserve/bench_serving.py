"""`python -m stepserve.bench_serving ...`: the serving benchmark under SGLang's module-style name."""

import sys

from stepserve.bench.serving import main

if __name__ == "__main__":
    sys.exit(main())
