from kdcube.cli import main

main()
