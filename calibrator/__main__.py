from calibrator.cli.main import main

raise SystemExit(main())
