"""`python -m fedlodrop`: the `fedlodrop` command."""

from fedlodrop.cli import main

main()
