"""`python -m natfail` is the `natfail` program."""

from natfail.cli.daemon_main import main

raise SystemExit(main())
