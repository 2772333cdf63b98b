from soupkit.cli import main

main()
