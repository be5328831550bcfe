import sys

from splitlearn.cli import main

sys.exit(main())
