import sys

from mdland.cli import main

sys.exit(main())
