"""`python -m consumers.cli`: the `casm` command."""

import sys

from consumers.cli.main import main

sys.exit(main())
