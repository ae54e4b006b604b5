"""Command-line interface: `kapao <verb>`; each verb lives in its own module with
`add_parser(subparsers)` and `run(args) -> int`."""
