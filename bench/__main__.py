"""`python -m bench`: the performance benchmark."""

from bench.run import main

raise SystemExit(main())
