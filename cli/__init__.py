"""`edit-mobile`: the console command, one module per subcommand (HELP, build_parser, main)."""
