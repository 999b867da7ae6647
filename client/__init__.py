"""gradserve's client side: the wire codec (also used by the server) and, soon, the client API."""
