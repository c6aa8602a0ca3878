"""`python -m zoo.quantize`: write a weight-only int8 / int4 copy of a checkpoint (zoo.entrypoints.quantize)."""
import sys

from zoo.entrypoints.quantize import main

if __name__ == "__main__":
    sys.exit(main())
