"""HTTP routers. They call `ModelService` and never touch torch."""
