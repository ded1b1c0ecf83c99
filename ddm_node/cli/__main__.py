import sys

from ddm_node.cli.main import main

sys.exit(main())
