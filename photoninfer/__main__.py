import sys

from photoninfer.cli import main

sys.exit(main())
