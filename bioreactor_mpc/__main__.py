import sys

from bioreactor_mpc.cli import main

sys.exit(main())
