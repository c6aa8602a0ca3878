"""python -m zoo.llama.infer [--compiled] [--prompt TEXT ...] [--model-path DIR] — see --help."""
import sys

from zoo.entrypoints.generate import main

if __name__ == "__main__":
    sys.exit(main("llama"))
