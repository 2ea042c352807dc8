import sys

from train.compile.cli import main

sys.exit(main())
