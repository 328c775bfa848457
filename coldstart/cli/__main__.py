"""`python -m coldstart.cli …`: how the dev stack and the tests start service processes."""

from coldstart.cli import main

main()
