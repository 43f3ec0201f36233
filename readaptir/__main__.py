from readaptir.cli import main

main()
