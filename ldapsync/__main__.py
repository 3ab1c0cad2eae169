import sys

from ldapsync.cli import main

sys.exit(main())
