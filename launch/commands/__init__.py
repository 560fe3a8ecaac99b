"""One module per `tessera` subcommand, each with ``add_arguments(parser)`` and ``run(args)``."""
