import sys

from rlds.cli import main

sys.exit(main())
