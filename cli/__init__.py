"""The ``gradserve`` command (``main``): it starts the server (``serve``) and calls it (``grad``,
``ops``, ``health``, ``loadtest``), so it sits above both the server and the client, which never
import each other."""
