from dpfl.cli import main

raise SystemExit(main())
