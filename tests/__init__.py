"""The test suite; its shared modules (torch references, XLA cost functions, tiny models)
import as tests.*."""
