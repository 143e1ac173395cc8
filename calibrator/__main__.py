from calibrator.cli.entry import entry

raise SystemExit(entry())
