"""`python -m zoo.export`: the AOTInductor export command (zoo.entrypoints.export)."""
import sys

from zoo.entrypoints.export import main

if __name__ == "__main__":
    sys.exit(main())
