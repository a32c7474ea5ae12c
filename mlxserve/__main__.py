import sys

from mlxserve.cli import main

sys.exit(main())
