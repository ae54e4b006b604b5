import sys

from kapao.cli.main import main

sys.exit(main())
