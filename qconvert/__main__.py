from qconvert.cli import main

main()
