"""gradserve's gRPC server: the wire service, dynamic batching, limits and lifecycle."""
