from minserve.cli import main

main()
