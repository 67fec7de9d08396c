from natfail.lab.cli import main

raise SystemExit(main())
