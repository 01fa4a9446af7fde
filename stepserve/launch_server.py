"""`python -m stepserve.launch_server`: SGLang's launch_server command line, served by stepserve."""

import sys

from stepserve.cli import serve

if __name__ == "__main__":
    sys.exit(serve(prog="python -m stepserve.launch_server"))
