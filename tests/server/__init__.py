"""End-to-end tests of the gRPC server: real servers on 127.0.0.1, raw generated stubs."""
