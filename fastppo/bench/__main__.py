import sys

from fastppo.bench import main

sys.exit(main())
