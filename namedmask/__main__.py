from namedmask.cli import main

main()
