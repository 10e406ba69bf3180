from dbsync.cli import main

raise SystemExit(main())
