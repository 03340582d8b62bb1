import sys

from e3relax_ase.cli.main import main

sys.exit(main())
