from omni_export.cli import main

main()
