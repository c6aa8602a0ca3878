"""python -m zoo.pd --role prompt|decoder ...  |  python -m zoo.pd demo"""
import sys

from zoo.pd.cli import main

sys.exit(main())
