"""The test suite; its helper modules (torch references, XLA cost helpers) import as tests.*."""
