from autorecbench.cli.app import main

main()
