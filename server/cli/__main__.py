"""`python -m server.cli`: the `t2serve` command (how the tests and benchmarks start it)."""

import os

from server.cli import main

if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
