import sys

from hiertrain.cli import main

sys.exit(main())
