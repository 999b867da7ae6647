"""``python -m gradserve.server [flags]``: run the gradserve server (see ``--help``)."""

from gradserve.server.app import main

main()
