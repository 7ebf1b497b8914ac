"""`python -m mmfm ...` runs the `mmfm` command line."""

from mmfm.cli import main

raise SystemExit(main())
