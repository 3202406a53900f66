from dstfs.cli import main

raise SystemExit(main())
