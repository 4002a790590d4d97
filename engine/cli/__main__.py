"""`python -m stepline.cli` runs the command line, as the `stepline` script does."""

from stepline.cli.main import main

main()
