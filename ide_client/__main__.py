import sys

from ide_client.cli import main

sys.exit(main())
