from obinfer.cli import main

raise SystemExit(main())
