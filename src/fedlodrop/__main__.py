from fedlodrop.cli import main

main()
