import sys

from sllmd.cli import main

sys.exit(main())
