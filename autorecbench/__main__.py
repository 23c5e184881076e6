from autorecbench.cli import main

main()
