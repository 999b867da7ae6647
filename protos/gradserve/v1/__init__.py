"""The gradserve.v1 wire contract: code generated from gradserve.proto by ``protos/generate``."""
